"""CorDA — Yang et al. 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large Language
Models" (NeurIPS 2024, arXiv:2406.05223).

A modifier of the ``"init"`` slot that looks at data: each layer's weight is decomposed in the
metric of its input covariance over the run's first training batches, and one end of that
spectrum becomes the adapter while the base keeps the rest, so the adapted model starts equal to
the original (§3.2, Eq. 3–5). The steps follow PEFT 0.21's ``peft.tuners.lora.corda``::

    x_i ← x_i / max(x_i)              (one row's attended tokens, PEFT's normalisation)
    C   = mean over rows of x_iᵀ·x_i   (in×in, float32, §3.2)
    C'  = C + λ·mean(diag C)·I         (λ = 0.01, doubled until ‖C'·C'⁻¹ − I‖_F < 0.05)
    W·C' = U·S·Vhᵀ      V = (Vh·C'⁻¹)ᵀ  (so U·S·Vᵀ = W exactly, Eq. 4)
    ipm: the r largest (instruction-previewed, §3.3)   kpm: the r smallest (knowledge-preserved)
    A = diag(√(S_r/s))·V_rᵀ     B = U_r·diag(√(S_r/s))
    base ← quant(W − s·B·A)            (W: the full-precision weight; the residual is quantized)

The result (A₀, B₀ of every layer) is saved with the adapter, so ``--resume``, ``qpeft eval`` and
``--init-adapter`` rebuild the init from W without data (plugins/adapters/_residual.py). PEFT's
files hold the trained adapter as a plain rank-2r LoRA over the original W, [B, −B₀]·[A; A₀]
(PEFT's own conversion, ``path_initial_model_for_weight_conversion``).

    lora+corda      lora+corda:mode=kpm      dora+corda:calibration_batches=16      lora+corda+rslora
"""
import dataclasses

import torch

from qpeft import Adapter, OptionsError, adapter_layers, hookimpl, option
from qpeft.plugins.adapters import _residual
from qpeft.plugins.adapters._svd import source_weight

MODES = ("ipm", "kpm")
DAMP, INV_ERROR, DOUBLINGS = 0.01, 0.05, 40     # PEFT's λ₀ and inverse tolerance; a bound on the doublings


@dataclasses.dataclass
class CorDAOptions:
    calibration_batches: int = option(8, "training batches whose layer inputs give each covariance C")
    mode: str = option("ipm", "ipm: the adapter starts from the r largest components of W·C (instruction-previewed); "
                              "kpm: from the r smallest, the base keeps the knowledge (knowledge-preserved)")

    def __post_init__(self):
        if self.calibration_batches < 1:
            raise ValueError(f"calibration_batches must be at least 1, got {self.calibration_batches}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be ipm or kpm, got '{self.mode}'")


class CorDA(Adapter):
    name = "corda"
    description = ("CorDA: B, A from the SVD of W·C (C: input covariance on training data), top (ipm) or bottom "
                   "(kpm) r; base ← quant(W − s·B·A) (Yang et al. 2024)")
    role = "modifier"
    modifies = "init"
    needs_source_weights = True
    Options = CorDAOptions
    peft_note = ("CorDA rewrote the base to quant(W − s·B₀·A₀): the PEFT files hold the equivalent rank-2r LoRA "
                 "[B, −B₀]·[A; A₀] over the original W, exact over a full-precision base; over a quantized one "
                 "PEFT adds it to quant(W), another model (+24 % perplexity over nf4 on SmolLM2-135M, docs/adapters.md): "
                 "there load it with qpeft (qpeft eval, qpeft.load_adapter) or ship the merged model: qpeft export "
                 "RUN --merge")

    def initialize(self, layer, scaling: float) -> None:
        """Nothing at attach but a check: the decomposition comes in :meth:`apply_calibration`."""
        _residual.refuse_other_updates(layer, self.name)

    def calibration_batches(self) -> int:
        return self.options.calibration_batches

    @torch.no_grad()
    def calibrate(self, model, batches) -> dict:
        """Each layer's A₀, B₀ from its input covariance (§3.2) and the SVD of W·C (Eq. 4)."""
        layers = adapter_layers(model)
        sums = {name: 0 for name in layers}
        counts = dict.fromkeys(layers, 0)
        rows = {}

        def hook(name):
            def add(module, args, output):
                x = args[0]
                for i in range(x.shape[0]):
                    row = x[i][rows["mask"][i]].float()
                    row = row / row.max().abs()
                    sums[name] = sums[name] + row.t() @ row
                    counts[name] += 1
            return add

        hooks = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
        try:
            for batch in batches:
                ids = batch["input_ids"]
                rows["mask"] = batch.get("attention_mask", torch.ones_like(ids)).bool()
                model(**batch)
        finally:
            for h in hooks:
                h.remove()
        state = {}
        for name, layer in layers.items():
            a, b = self.decompose(source_weight(layer), sums.pop(name) / counts[name], layer.r, layer.scaling, name)
            state.update(_residual.state_of(name, a, b))
        return state

    def decompose(self, weight, covariance, r: int, scaling: float, name: str = "a layer"):
        """``(A, B)`` from W and the input covariance C (Eq. 4–5, PEFT's damping of C)."""
        if r > min(weight.shape):
            raise OptionsError(f"corda needs r ≤ {min(weight.shape)} for {name}; lower r")
        eye = torch.eye(covariance.shape[0], device=covariance.device)
        damp = DAMP
        for _ in range(DOUBLINGS):
            fixed = covariance + eye * covariance.diagonal().mean() * damp
            inverse = torch.linalg.inv(fixed)
            if torch.dist(fixed @ inverse, eye).item() < INV_ERROR:
                break
            damp *= 2
        else:
            raise OptionsError(f"corda: the input covariance of {name} cannot be inverted; raise "
                               "corda:calibration_batches (more distinct tokens)")
        u, s, vh = torch.linalg.svd(weight.to(fixed.device) @ fixed, full_matrices=False)
        v = (vh @ inverse).t()
        keep = slice(0, r) if self.options.mode == "ipm" else slice(s.shape[0] - r, s.shape[0])
        root = (s[keep] / scaling).sqrt()
        return v[:, keep].t() * root[:, None], u[:, keep] * root

    def peft_tensors(self, layer, tensors: dict) -> dict:
        """For PEFT: the rank-2r LoRA [B, −B₀]·[A; A₀] over the original W, which PEFT loads as a plain
        LoRA (``init_lora_weights: true``) to the same model, rather than ``"corda"``, which its loader
        cannot rerun without data."""
        return _residual.converted(layer, tensors)

    def apply_calibration(self, model, state: dict) -> None:
        """A ← A₀, B ← B₀, base ← quant(W − s·B₀·A₀) (Eq. 5), from the saved state, without data."""
        _residual.apply(model, state, self.name)


@hookimpl
def register_adapters(register):
    register(CorDA)
