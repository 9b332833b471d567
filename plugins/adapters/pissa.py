"""PiSSA — Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation
of Large Language Models" (NeurIPS 2024, arXiv:2404.02948).

A modifier of the ``"init"`` slot: B and A start as the principal part of the frozen weight,
and the base keeps the rest, so the adapted model starts equal to the original (§3, Eqs. 2–4)::

    W = U·S·Vᵀ                                    (full SVD; or randomized with niter > 0, §4.5)
    A = diag(√(S[:r]/s))·Vᵀ[:r]   B = U[:, :r]·diag(√(S[:r]/s))      (PEFT's split, s·B·A = U_r·S_r·V_rᵀ)
    base ← quant(W − s·B·A)                        (QPiSSA, §4.4: the residual is what is quantized)

W is the full-precision weight (it declares ``needs_source_weights``), so over a lossy
quantizer the principal part is kept exact in B·A and only the residual, whose values are
smaller, is quantized — QPiSSA's reason to exist (§4.4). Loading a saved adapter runs the
decomposition again (it is deterministic; the randomized SVD is seeded).

PEFT's files: with the exact SVD, ``init_lora_weights: "pissa"``, and PEFT reruns it on load
(the residual W − U_r·S_r·V_rᵀ does not depend on the signs the SVD picks: over ``none`` the
logits are qpeft's). With ``niter`` > 0 PEFT would draw its own randomized SVD from the global
RNG, another base, so the file holds the trained adapter as the rank-2r LoRA [B, −B₀]·[A; A₀]
over the original W (``init_lora_weights: true``; plugins/adapters/_residual.py, ``converted``).

    lora+pissa      lora:r=8+pissa:niter=4      dora+pissa      lora+pissa+rslora
"""
import dataclasses

import torch

from qpeft import Adapter, OptionsError, hookimpl, option
from qpeft.plugins.adapters import _residual
from qpeft.plugins.adapters._svd import source_weight


@dataclasses.dataclass
class PiSSAOptions:
    niter: int = option(0, "0: exact SVD; N > 0: randomized SVD with N subspace iterations (faster, §4.5)")

    def __post_init__(self):
        if self.niter < 0:
            raise ValueError(f"niter must be ≥ 0, got {self.niter}")


class PiSSA(Adapter):
    name = "pissa"
    description = "PiSSA: B, A from the top-r singular triplets of W; base ← quant(W − s·B·A) (Meng et al. 2024)"
    role = "modifier"
    modifies = "init"
    needs_source_weights = True
    Options = PiSSAOptions
    peft_note = ("PiSSA rewrote the base to quant(W − s·B₀·A₀): PEFT reruns the exact SVD (\"pissa\") or loads the "
                 "rank-2r LoRA over W (niter > 0), qpeft's model over a full-precision base; over a quantized one "
                 "it is not (PEFT keeps the residual unquantized and refuses a bitsandbytes base; the niter file over "
                 "bnb nf4: +10 % perplexity on SmolLM2-135M, docs/adapters.md): there load it with qpeft (qpeft eval, "
                 "qpeft.load_adapter) or ship the merged model: qpeft export RUN --merge")

    @torch.no_grad()
    def initialize(self, layer, scaling: float) -> None:
        """A, B from the top-r singular triplets of W, divided by s as PEFT does; base ← W − s·B·A (§3)."""
        weight = source_weight(layer)
        r = layer.lora_A.shape[0]
        if r > min(weight.shape):
            raise OptionsError(f"pissa needs r ≤ {min(weight.shape)} for a {weight.shape[0]}×{weight.shape[1]} "
                               f"layer; lower r")
        if self.options.niter:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                u, s, v = torch.svd_lowrank(weight, r, niter=self.options.niter)
            vh = v.t()
        else:
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        root = (s[:r] / scaling).sqrt()
        layer.lora_A.copy_(root[:, None] * vh[:r])
        layer.lora_B.copy_(u[:, :r] * root)
        a0, b0 = layer.lora_A.detach().float(), layer.lora_B.detach().float()   # as the adapter holds them
        layer.set_base_weight(weight - scaling * (b0 @ a0))
        if self.options.niter:       # kept for peft_tensors: PEFT cannot rerun this SVD
            layer.calibrated_init = (a0.cpu().clone(), b0.cpu().clone())

    def update_peft_config(self, config: dict) -> None:
        """The exact SVD: PEFT reruns it on load (``"pissa"``), the same base. With niter > 0 the
        rank-2r file of :meth:`peft_tensors` is a plain LoRA (``init_lora_weights: true``)."""
        if not self.options.niter:
            config["init_lora_weights"] = "pissa"

    def peft_tensors(self, layer, tensors: dict) -> dict:
        """With niter > 0: the rank-2r LoRA [B, −B₀]·[A; A₀] over the original W, since PEFT's own
        randomized SVD (``"pissa_niter_N"``, unseeded) would rebuild another base."""
        return _residual.converted(layer, tensors) if self.options.niter else tensors

    @classmethod
    def from_peft_config(cls, config: dict) -> dict | None:
        """Taken for ``init_lora_weights: "pissa"`` or ``"pissa_niter_N"``."""
        init = config.get("init_lora_weights")
        if not isinstance(init, str) or not init.startswith("pissa"):
            return None
        return {"niter": int(init.rpartition("_niter_")[2]) if "_niter_" in init else 0}


@hookimpl
def register_adapters(register):
    register(PiSSA)
