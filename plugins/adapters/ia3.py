"""IA³ — Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning" (arXiv:2205.05638).

IA³ learns vectors that rescale activations (§3.3): the keys and values of attention and
the intermediate activation of the feed-forward block::

    k = l_k ⊙ (W_k·x)     v = l_v ⊙ (W_v·x)     y = W_down·(l_ff ⊙ h)

Each vector starts at ones, so the adapted model starts equal to the base model. As in
PEFT's Llama defaults, ``k_proj`` and ``v_proj`` are scaled at their output and
``down_proj`` (a "feed-forward" module) at its input. IA³ has no low-rank update, hence
no slots: it composes with no modifier.

Precision: each l starts at 1 and moves by fractions of a percent in training; rounded
into a bf16 activation (half an ulp is 0.2–0.4 %) most of that change is lost, so the
bf16 model scores as if barely trained while its merged float32 export does not (measured
on the embedded model after 10 nf4 steps: perplexity 28.7 in bf16 against 25.4 merged).
IA³ therefore declares ``needs_float32_activations``: the activations stay float32 between
layers and only the quantized matmuls run in the compute dtype (25.30 against 25.39).
"""
import dataclasses
from typing import Literal

import torch
from torch import nn

from qpeft import (DTYPES, AdapterLayer, AdapterMethod, OptionsError, QuantizedLinear, hookimpl, layer_device,
                   option, peft_format, target_matches)


class IA3Output(AdapterLayer):
    """``h = l ⊙ base(x)``: a learned vector scaling each output feature (§3.3)."""

    def __init__(self, base: QuantizedLinear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base = base
        self.ia3_l = nn.Parameter(torch.ones(base.out_features, 1, dtype=dtype,
                                             device=layer_device(base)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return (out * self.ia3_l.flatten()).to(out.dtype)

    def merged_weight(self) -> torch.Tensor:
        return self.base.dequantize() * self.ia3_l.detach().float()

    def merged_bias(self) -> torch.Tensor | None:
        bias = super().merged_bias()
        return None if bias is None else bias * self.ia3_l.detach().float().flatten()

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l}


class IA3Input(AdapterLayer):
    """``h = base(l ⊙ x)``: a learned vector scaling each input feature (§3.3, l_ff)."""

    def __init__(self, base: QuantizedLinear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base = base
        self.ia3_l = nn.Parameter(torch.ones(1, base.in_features, dtype=dtype,
                                             device=layer_device(base)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x * self.ia3_l.flatten().to(x.dtype))

    def merged_weight(self) -> torch.Tensor:
        return self.base.dequantize() * self.ia3_l.detach().float()

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l}


@dataclasses.dataclass
class IA3Options:
    """Which layers IA³ rescales, and where."""

    targets: list[str] = option(["k_proj", "v_proj", "down_proj"], "layer-name suffixes to rescale")
    feedforward: list[str] = option(["down_proj"], "of the targets, those scaled at their input "
                                    "(feed-forward, §3.3); the others are scaled at their output")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "dtype of the IA³ vectors")

    def __post_init__(self):
        if not self.targets:
            raise ValueError("targets is empty; name layers such as k_proj,v_proj,down_proj")
        extra = [f for f in self.feedforward if f not in self.targets]
        if extra:
            raise ValueError(f"feedforward names {', '.join(extra)}, which is not among the targets")


class IA3(AdapterMethod):
    name = "ia3"
    description = "IA³: learned vectors rescaling keys, values and feed-forward activations (Liu et al. 2022)"
    slots = frozenset()
    Options = IA3Options
    peft_type = "IA3"
    needs_float32_activations = True   # l ≈ 1 ± 0.3 % is rounded away in a bf16 stream

    def wrap(self, name: str, base: QuantizedLinear, modifiers: list) -> AdapterLayer:
        """IA3Input for a feed-forward target (scaled at its input), else IA3Output (§3.3)."""
        if modifiers:  # compose() already refuses this; guard direct callers
            raise OptionsError(f"adapter '{self.name}' takes no modifiers")
        cls = IA3Input if target_matches(name, self.options.feedforward) else IA3Output
        return cls(base, DTYPES[self.options.dtype])

    @classmethod
    def from_peft_config(cls, config: dict) -> dict | None:
        """Options for a PEFT IA³ adapter: its ``target_modules`` and ``feedforward_modules``."""
        if config.get("peft_type") != "IA3":
            return None
        return {"targets": config["target_modules"], "feedforward": config.get("feedforward_modules") or []}

    def peft_config(self, model: nn.Module) -> dict:
        layers = [n for n, m in model.named_modules() if isinstance(m, IA3Input)]
        return {"peft_type": self.peft_type, "init_ia3_weights": True,
                "target_modules": peft_format.target_modules(model),
                "feedforward_modules": peft_format.target_modules(model, set(layers)) if layers else []}


@hookimpl
def register_adapters(register):
    register(IA3)
