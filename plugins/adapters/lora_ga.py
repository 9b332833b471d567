"""LoRA-GA — Wang et al. 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation"
(NeurIPS 2024, arXiv:2407.05000).

A modifier of the ``"init"`` slot that looks at data: A and B start from the singular vectors
of each layer's full weight gradient on the run's first training batches, so the first step of
LoRA moves the weight along the full fine-tune's first step (§3.2, Eq. 8–9), and the base keeps
W − s·B·A, so the model starts equal to the original (§3.3). The steps follow PEFT 0.21's
``peft.tuners.lora.loraga``::

    G   = (1/N)·Σ_batches Σ_tokens ∂L/∂y ᵀ · x     (out×in, float32: the gradient of the frozen W,
                                                  from hooks — the base is quantized and frozen)
    G ≈ U·S·Vᵀ   (randomized SVD, q = min(4r, in, out), niter iterations, seeded; niter=0: exact)
    ArB2r: A = V[:, :r]ᵀ   B = U[:, r:2r]·S[r:2r]  (A2rBr: A = V[:, r:2r]ᵀ, B = U[:, :r]·S[:r]; ArBr:
           A from the odd, B from the even components; random: r of the first 2r, seeded)
    stable: B ← B·out^¼/√γ (§3.3)   weight_svd: B ← B·σ₁(W)/S_B[0]   gd_scale: A, B ← A/s, B/s   unit: —
    base ← quant(W − s·B·A)                        (W: the full-precision weight)

The gradient is that of the model being trained (the quantized base with B = 0), taken in the
mode calibration runs in (eval: no dropout). The result (A₀, B₀ of every layer) is saved with
the adapter, so ``--resume``, ``qpeft eval`` and ``--init-adapter`` rebuild the init from W
without data (plugins/adapters/_residual.py). PEFT's files hold the trained adapter as a plain
rank-2r LoRA over the original W, [B, −B₀]·[A; A₀] (PEFT's ``path_initial_model_for_weight_conversion``).

    lora+lora-ga      lora+lora-ga:direction=A2rBr:scale=unit      dora+lora-ga      lora+lora-ga+rslora
"""
import dataclasses

import torch

from qpeft import Adapter, OptionsError, adapter_layers, hookimpl, option
from qpeft.plugins.adapters import _residual
from qpeft.plugins.adapters._svd import source_weight

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")


@dataclasses.dataclass
class LoRAGAOptions:
    calibration_batches: int = option(8, "training batches (forward + backward) whose mean gradient G is decomposed")
    direction: str = option("ArB2r", "which singular vectors of G go to A and B: ArB2r, A2rBr, ArBr or random")
    scale: str = option("stable", "stable (B·out^¼/√γ), weight_svd, gd_scale or unit")
    stable_gamma: float = option(16.0, "γ of the stable scale")
    niter: int = option(4, "subspace iterations of the randomized SVD of G (0: exact SVD)")

    def __post_init__(self):
        if self.calibration_batches < 1:
            raise ValueError(f"calibration_batches must be at least 1, got {self.calibration_batches}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got '{self.direction}'")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, got '{self.scale}'")
        if self.stable_gamma <= 0:
            raise ValueError(f"stable_gamma must be > 0, got {self.stable_gamma}")
        if self.niter < 0:
            raise ValueError(f"niter must be ≥ 0, got {self.niter}")


class LoRAGA(Adapter):
    name = "lora-ga"
    description = ("LoRA-GA: A, B from the SVD of each layer's weight gradient on training data; "
                   "base ← quant(W − s·B·A) (Wang et al. 2024)")
    role = "modifier"
    modifies = "init"
    needs_source_weights = True
    Options = LoRAGAOptions
    peft_note = ("LoRA-GA rewrote the base to quant(W − s·B₀·A₀): the PEFT files hold the equivalent rank-2r LoRA "
                 "[B, −B₀]·[A; A₀] over the original W, exact over a full-precision base; over a quantized one "
                 "PEFT adds it to quant(W), another model (+1 % perplexity over nf4 on SmolLM2-135M, docs/adapters.md): "
                 "there load it with qpeft (qpeft eval, qpeft.load_adapter) or ship the merged model: qpeft export "
                 "RUN --merge")

    def initialize(self, layer, scaling: float) -> None:
        """Nothing at attach but checks: A, B come in :meth:`apply_calibration`."""
        _residual.refuse_other_updates(layer, self.name)
        if 2 * layer.r > min(layer.lora_B.shape[0], layer.lora_A.shape[1]):
            raise OptionsError(f"lora-ga needs 2r ≤ {min(layer.lora_B.shape[0], layer.lora_A.shape[1])} for a "
                               f"{layer.lora_B.shape[0]}×{layer.lora_A.shape[1]} layer; lower r")

    def calibration_batches(self) -> int:
        return self.options.calibration_batches

    def calibrate(self, model, batches) -> dict:
        """Each layer's mean weight gradient over the batches, then A₀, B₀ from its SVD (§3.2)."""
        layers = adapter_layers(model)
        grads = {name: torch.zeros(layer.lora_B.shape[0], layer.lora_A.shape[1], device=layer.lora_A.device)
                 for name, layer in layers.items()}
        counts = dict.fromkeys(layers, 0)
        trainable = [p for p in model.parameters() if p.requires_grad]
        hooks = [model.get_input_embeddings().register_forward_hook(_track)]
        hooks += [layer.register_forward_hook(_gradient_of(name, grads, counts)) for name, layer in layers.items()]
        try:
            for p in trainable:        # frozen for the estimate, as PEFT does: no parameter's .grad is touched
                p.requires_grad_(False)
            with torch.enable_grad():
                for batch in batches:
                    model(**batch).loss.backward()
        finally:
            for h in hooks:
                h.remove()
            for p in trainable:
                p.requires_grad_(True)
        state = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for name, layer in layers.items():
                if not counts[name]:
                    raise OptionsError(f"lora-ga: {name} took no part in the loss; leave it out of the targets")
                a, b = self.factors(grads.pop(name) / counts[name], source_weight(layer), layer.r, layer.scaling)
                state.update(_residual.state_of(name, a, b))
        return state

    @torch.no_grad()
    def factors(self, grad, weight, r: int, scaling: float):
        """``(A, B)`` from the gradient's singular vectors (§3.2) and the chosen scale (§3.3)."""
        if self.options.niter:
            u, s, v = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=self.options.niter)
            vh = v.t()
        else:
            u, s, vh = torch.linalg.svd(grad, full_matrices=False)
        u, s, vh = u[:, :2 * r], s[:2 * r], vh[:2 * r]
        direction = self.options.direction
        if direction == "ArB2r":
            a_rows, b_cols = slice(0, r), slice(r, 2 * r)
        elif direction == "A2rBr":
            a_rows, b_cols = slice(r, 2 * r), slice(0, r)
        elif direction == "ArBr":
            a_rows, b_cols = slice(1, 2 * r, 2), slice(0, 2 * r, 2)
        else:
            a_rows = b_cols = torch.randperm(2 * r)[:r]
        a, s_b = vh[a_rows], s[b_cols]
        b = u[:, b_cols] * s_b
        if self.options.scale == "stable":
            b = b * (grad.shape[0] ** 0.25 / self.options.stable_gamma ** 0.5)
        elif self.options.scale == "weight_svd" and s_b[0] > 0:
            b = b * (torch.linalg.matrix_norm(weight.to(b.device), ord=2) / s_b[0])
        elif self.options.scale == "gd_scale":
            a, b = a / scaling, b / scaling
        return a.contiguous(), b.contiguous()

    def peft_tensors(self, layer, tensors: dict) -> dict:
        """For PEFT: the rank-2r LoRA [B, −B₀]·[A; A₀] over the original W (``init_lora_weights:
        true``), rather than ``"lora_ga"``, which PEFT's loader skips, adding B·A to the unrewritten W."""
        return _residual.converted(layer, tensors)

    def apply_calibration(self, model, state: dict) -> None:
        """A ← A₀, B ← B₀, base ← quant(W − s·B₀·A₀), from the saved state, without data."""
        _residual.apply(model, state, self.name)


def _track(module, args, output):
    """A forward hook on the input embeddings: their output requires grad (every parameter is
    frozen during the estimate), so the loss's gradient reaches every layer's output."""
    if not output.requires_grad:
        output.requires_grad_()


def _gradient_of(name: str, grads: dict, counts: dict):
    """A forward hook that adds ∂L/∂y ᵀ·x (the gradient of W for this batch) once y's gradient
    arrives; the layer's output at B = 0 is W·x, so this is the frozen weight's gradient. Counted
    when the gradient arrives, so a recomputed forward (gradient checkpointing) counts once."""
    def hook(module, args, output):
        if not output.requires_grad:
            return
        x = args[0].detach()

        def add(g):
            grads[name].addmm_(g.reshape(-1, g.shape[-1]).float().t(), x.reshape(-1, x.shape[-1]).float())
            counts[name] += 1
        output.register_hook(add)
    return hook


@hookimpl
def register_adapters(register):
    register(LoRAGA)
