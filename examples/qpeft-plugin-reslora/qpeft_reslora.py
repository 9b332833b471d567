"""ResLoRA — Shi et al. 2024, "ResLoRA: Identity Residual Mapping in Low-Rank Adaption"
(arXiv:2402.18039, Findings of ACL 2024), as a third-party qpeft method plugin.

The LoRA layers of one name in successive blocks (``model.layers.{n}.self_attn.q_proj``)
form a *chain* n = 0, 1, 2, …  In training, ResLoRA adds identity shortcuts along that
chain (paper, section "ResLoRA Blocks"), so the gradient reaches block n's LoRA through a
shorter path than the whole stack of frozen blocks::

    input-shortcut   h_n = W_n·x_n + s·B_n·A_n·(x_n + x_{n−1})                x_{−1} := x_0
    block-shortcut   h_n = W_n·x_n + s·(Σ_{i=0…m} B_{n−i}·A_{n−i})·x_n
    middle-shortcut  h_n = W_n·x_n + s·B_n·(Σ_{i=0…m} A_{n−i}·x_{n−i})           m = pre_num

    x_{n−1}: input of block n−1's same-named layer, this forward pass ─┐
    x_n ──▶ base (quantized, frozen) ───────────────────────────┐      │
     └───────────────────────────────────────▶ (+) ◀─────────────┼──────┘
                                               └─▶ dropout ▶ A_n ▶ B_n ▶ ·s ─▶ (+) ─▶ h_n

For inference the shortcuts are merged away (section "Merging Approaches"): every layer
becomes a plain LoRA ``W + s·B*·A*``. ``model.eval()`` already computes that form, so the
evaluation after training, ``merge`` and the saved adapter (a plain PEFT LoRA) agree:

- block-shortcut — exact: B*·A* = Σ_{i≤m} B_{n−i}·A_{n−i} (stacked: rank (m+1)·r, zero-padded
  for the first blocks);
- input-shortcut — approximate: assume x_{n−1} ≈ α_n·x_n, so B* = (1+α_n)·B_n, A* = A_n.
  α_0 = 1 is exact (x_{−1} := x_0). For n ≥ 1 the paper estimates α_n from norms, in two ways:
  ``merge=input``: α_n = mean‖x_{n−1}‖_F / mean‖x_n‖_F over the last ``window`` training
  passes (merge based on input; the authors' release keeps 100);
  ``merge=weight``: α_n = ‖W*_{n−2}‖_F / ‖W*_{n−1}‖_F with W*_k = Ŵ_k + s·B_k·A_k, α_1 = 1
  (merge based on weights: the input norm grows with the weights that produced it);
- middle-shortcut — approximate, our application of the input-norm rule to each term:
  A_{n−i}·x_{n−i} ≈ c_{n,i}·A_{n−i}·x_n with c_{n,i} = mean‖x_{n−i}‖_F / mean‖x_n‖_F, so
  A* = A_n + Σ_i c_{n,i}·A_{n−i}, B* = B_n (rank r).

Only the "scaling" slot is declared: an init modifier (LoftQ, OLoRA) relies on
``Ŵ + s·B·A = W`` at the start, which the shortcut terms break.
"""
import dataclasses
import re
from typing import Literal

import torch

from qpeft import LoRALinear, LoRAOptions, LowRankMethod, QpeftError, adapter_layers, hookimpl, option

BLOCK = re.compile(r"(^|\.)(\d+)\.")  # the first numeric path component: the block index


class Chain:
    """Same-named ResLoRA layers of successive blocks, and what each recorded this pass.

    Layer 0 clears the records when a forward pass reaches it; layer n reads what layers
    n−1, n−2, … recorded in the same pass. A plain object, not a module, so the layers
    it lists are not registered twice.
    """

    def __init__(self):
        self.layers: list["ResLoRALinear"] = []
        self.records: dict[int, torch.Tensor] = {}

    def previous(self, index: int, count: int, like: torch.Tensor) -> list[torch.Tensor]:
        """What layers index−1 … index−count recorded in this pass (shapes checked)."""
        out = []
        for k in range(index - 1, index - count - 1, -1):
            got = self.records.get(k)
            name = f"block {k}'s layer (chain of {len(self.layers)})"
            if got is None:
                raise QpeftError(f"reslora: {name} did not run before block {index}'s in this forward "
                                 "pass; ResLoRA needs the blocks to run in order in training")
            if got.shape[:-1] != like.shape[:-1]:
                raise QpeftError(f"reslora: {name} saw a batch of shape {tuple(got.shape[:-1])}, block "
                                 f"{index}'s {tuple(like.shape[:-1])}; one forward pass must keep its shape")
            out.append(got)
        return out


class ResLoRALinear(LoRALinear):
    """A LoRA layer that, in training, also sees earlier blocks of its chain (see module doc)."""

    def __init__(self, base, r: int, scaling: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32, variant: str = "input", pre_num: int = 1,
                 merge: str = "input", window: int = 100):
        super().__init__(base, r, scaling, dropout, dtype)
        self.variant, self.pre_num, self.merge_rule = variant, pre_num, merge
        self.chain, self.index = Chain(), 0  # linked across blocks by ResLoRA.attach
        self.chain.layers.append(self)
        self.register_buffer("input_norms", torch.zeros(window, device=self.lora_A.device),
                             persistent=False)
        self.seen = 0            # training passes recorded in input_norms (a ring buffer)
        self._cache = (None, None)
        self._loaded = None      # (own key, pair) after loading a saved adapter

    # -- the chain -------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """How many earlier blocks this layer's shortcut reaches."""
        return min(self.index, 1 if self.variant == "input" else self.pre_num)

    def earlier(self, i: int) -> "ResLoRALinear":
        return self.chain.layers[self.index - i]

    def train(self, mode: bool = True):
        self.chain.records.clear()  # drop the last pass's activations (and their graph)
        return super().train(mode)

    # -- training: the residual forms ----------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.training:
            a, b = self.inference_pair()
            return out + (((x.to(a.dtype) @ a.t()) * self.scaling) @ b.t()).to(out.dtype)
        if self.index == 0:
            self.chain.records.clear()  # a new forward pass starts at block 0
        with torch.no_grad():
            self.input_norms[self.seen % len(self.input_norms)] = torch.linalg.vector_norm(
                x.detach(), dtype=torch.float32)
        self.seen += 1
        return out + self.residual_delta(x).to(out.dtype)

    def residual_delta(self, x: torch.Tensor) -> torch.Tensor:
        keep = self.index + 1 < len(self.chain.layers)  # a later block will read this record
        if self.variant == "block":
            a, b = self.block_pair(pad=False, grad=True)
            return ((self.dropout(x).to(a.dtype) @ a.t()) * self.scaling) @ b.t()
        if self.variant == "input":
            prev = self.chain.previous(self.index, 1, x)[0] if self.index else x  # x_{−1} := x_0
            if prev.shape != x.shape:
                raise QpeftError(f"reslora: inputs of shape {tuple(prev.shape)} and {tuple(x.shape)} "
                                 "meet in one chain; one forward pass must keep its shape")
            if keep:
                self.chain.records[self.index] = x
            return self.lora_delta(self.dropout(x + prev))
        z = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.t()  # middle: A_n·x_n
        total = z + sum(self.chain.previous(self.index, self.depth, z)) if self.depth else z
        if keep:
            self.chain.records[self.index] = z
        return (total * self.scaling) @ self.lora_B.t()

    def block_pair(self, pad: bool, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """[A_n; A_{n−1}; …] and [B_n, B_{n−1}, …]: B·A = Σ B_{n−i}·A_{n−i}; zero-padded to
        (pre_num+1)·r with ``pad`` so every layer saves at one PEFT rank."""
        layers = [self.earlier(i) for i in range(self.depth + 1)]
        a = torch.cat([l.lora_A if grad else l.lora_A.detach() for l in layers], dim=0)
        b = torch.cat([l.lora_B if grad else l.lora_B.detach() for l in layers], dim=1)
        missing = (self.pre_num + 1) * self.r - a.shape[0] if pad else 0
        if missing:
            a = torch.cat([a, a.new_zeros(missing, a.shape[1])], dim=0)
            b = torch.cat([b, b.new_zeros(b.shape[0], missing)], dim=1)
        return a, b

    # -- inference: the merged-away form ---------------------------------------------------
    def mean_input_norm(self) -> torch.Tensor | None:
        n = min(self.seen, len(self.input_norms))
        return self.input_norms[:n].mean() if n else None

    def norm_ratio(self, earlier: "ResLoRALinear") -> torch.Tensor | float:
        """mean‖x_earlier‖_F / mean‖x_n‖_F over the recorded passes (1 when none were)."""
        num, den = earlier.mean_input_norm(), self.mean_input_norm()
        return 1.0 if num is None or den is None or den <= 0 else num / den

    def plain_weight_norm(self) -> torch.Tensor:
        """‖Ŵ + s·B·A‖_F, float32 (the weight rule's W*)."""
        weight = self.base.dequantize().float().to(self.lora_A.device)
        return (weight + LoRALinear.delta_weight(self)).norm()

    def alpha(self) -> torch.Tensor | float:
        """α_n of the input-shortcut merge: x_{n−1} ≈ α_n·x_n."""
        if self.index == 0:
            return 1.0                                 # x_{−1} := x_0, exact
        if self.merge_rule == "input":
            return self.norm_ratio(self.earlier(1))
        if self.index == 1:
            return 1.0
        return self.earlier(2).plain_weight_norm() / self.earlier(1).plain_weight_norm()

    def _versions(self) -> tuple:
        return self.lora_A._version, self.lora_B._version, self.lora_A.dtype

    def _key(self, layers) -> tuple:
        return tuple((l.lora_A._version, l.lora_B._version, l.lora_A.data_ptr(), l.lora_B.data_ptr(),
                      l.lora_A.dtype, l.seen) for l in layers)

    @torch.no_grad()
    def inference_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A*, B*) with s·B*·A* the merged-away update; cached until a tensor it reads changes."""
        if self._loaded is not None and self._loaded[0] == self._versions():
            return tuple(t.to(self.lora_A.device) for t in self._loaded[1])
        key = self._key(self.chain.layers[max(0, self.index - max(self.pre_num, 2)):self.index + 1])
        if self._cache[0] != key:
            self._cache = (key, self._merged_pair())
        return self._cache[1]

    def _merged_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.lora_A.detach(), self.lora_B.detach()
        if self.variant == "block":
            return self.block_pair(pad=True)
        if self.variant == "input":
            return a.clone(), b * torch.as_tensor(1 + self.alpha(), dtype=b.dtype, device=b.device)
        a = a.clone()
        for i in range(1, self.depth + 1):
            ratio = torch.as_tensor(self.norm_ratio(self.earlier(i)), dtype=a.dtype, device=a.device)
            a += ratio * self.earlier(i).lora_A.detach()
        return a, b.clone()

    def delta_weight(self) -> torch.Tensor:
        """``s·B*·A*``, float32: what ``merge`` folds in."""
        a, b = self.inference_pair()
        return (b.float() @ a.float()) * self.scaling

    # -- save and load: the inference form is a plain LoRA -------------------------------
    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        a, b = self.inference_pair()
        return {"lora_A.weight": a, "lora_B.weight": b}

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load a saved inference form exactly; the training tensors start from its first
        r ranks (block-shortcut: exactly this layer's own A, B)."""
        a, b = tensors.get("lora_A.weight"), tensors.get("lora_B.weight")
        if a is None or b is None:
            raise QpeftError("saved adapter lacks lora_A.weight or lora_B.weight for a ResLoRALinear")
        if a.shape[1] != self.lora_A.shape[1] or b.shape[0] != self.lora_B.shape[0] \
                or a.shape[0] != b.shape[1] or a.shape[0] < self.r:
            raise QpeftError(f"saved tensors {tuple(a.shape)}, {tuple(b.shape)} do not fit a rank-{self.r} "
                             f"ResLoRA layer of shape {tuple(self.lora_B.shape[:1])}×{self.lora_A.shape[1]}")
        with torch.no_grad():
            self.lora_A.copy_(a[:self.r])
            self.lora_B.copy_(b[:, :self.r])
        pair = (a.to(self.lora_A).clone(), b.to(self.lora_B).clone())
        self._loaded = (self._versions(), pair)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, variant={self.variant}, block={self.index}"


@dataclasses.dataclass
class ResLoRAOptions(LoRAOptions):
    """LoRA's options plus the ResLoRA structure and merge rule."""

    variant: Literal["input", "block", "middle"] = option(
        "input", "residual structure: input-, block- or middle-shortcut (Shi et al. 2024, 'ResLoRA Blocks')")
    pre_num: int = option(1, "m: earlier blocks the block/middle shortcut reaches (input: always 1)")
    merge: Literal["input", "weight"] = option(
        "input", "how the input-shortcut's α is estimated for merging: input = ratio of recorded input "
        "norms, weight = ratio of earlier blocks' weight norms ('Merging Approaches')")
    window: int = option(100, "training passes whose input norms the input merge rule averages")

    def __post_init__(self):
        super().__post_init__()
        if self.pre_num < 1:
            raise ValueError(f"pre_num must be at least 1, got {self.pre_num}")
        if self.variant == "input" and self.pre_num != 1:
            raise ValueError("pre_num applies to variant=block or variant=middle; the input-shortcut "
                             "always reaches one block back")
        if self.merge == "weight" and self.variant != "input":
            raise ValueError(f"merge=weight is defined for variant=input only; use merge=input with "
                             f"variant={self.variant}")
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")


class ResLoRA(LowRankMethod):
    """The ``reslora`` method: LoRA's layers linked into per-name chains across blocks."""

    name = "reslora"
    description = ("ResLoRA: LoRA with identity shortcuts across blocks in training, merged away "
                   "for inference (Shi et al. 2024)")
    slots = frozenset({"scaling"})
    Options = ResLoRAOptions
    layer_cls = ResLoRALinear

    @property
    def saved_rank(self) -> int:
        """The rank of the saved plain LoRA (block-shortcut stacks pre_num+1 ranks)."""
        return self.rank * (self.options.pre_num + 1 if self.options.variant == "block" else 1)

    def make_layer(self, base, modifiers) -> ResLoRALinear:
        o = self.options
        return self.layer_cls(base, self.rank, self.scaling(modifiers), o.dropout, getattr(torch, o.dtype),
                              o.variant, o.pre_num, o.merge, o.window)

    def attach(self, model, modifiers) -> None:
        """LoRA's attach, then link the same-named layers of successive blocks into chains."""
        super().attach(model, modifiers)
        link_chains(model)

    def peft_config(self, model) -> dict:
        """A plain LoRA of the saved rank, with lora_alpha chosen so PEFT's scale is our s."""
        config = super().peft_config(model)
        rank, s = self.saved_rank, self.scaling(self.modifiers)
        config["r"] = rank
        config["lora_alpha"] = s * (rank ** 0.5 if config.get("use_rslora") else rank)
        return config


def link_chains(model) -> dict[str, Chain]:
    """Group the model's ResLoRA layers by name with the block index removed, in block order."""
    groups: dict[str, list] = {}
    for name, layer in adapter_layers(model).items():
        if isinstance(layer, ResLoRALinear):
            found = BLOCK.search(name)
            key = BLOCK.sub(r"\1*.", name, count=1)
            groups.setdefault(key, []).append((int(found.group(2)) if found else 0, layer))
    chains = {}
    for key, members in groups.items():
        chain = chains[key] = Chain()
        for index, (_, layer) in enumerate(sorted(members, key=lambda m: m[0])):
            layer.chain, layer.index = chain, index
            chain.layers.append(layer)
    return chains


@hookimpl
def register_adapters(register):
    register(ResLoRA)
