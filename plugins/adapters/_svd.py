"""What the SVD-based init modifiers (LoftQ, PiSSA) share: the full-precision weight of a
layer and a rank-r factorisation. A private module of the plugins package, not a plugin."""
import torch


def source_weight(layer) -> torch.Tensor:
    """The full-precision W (``base.source_weight``) if kept, else the dequantized Ŵ (float32)."""
    kept = layer.base.source_weight
    weight = kept if kept is not None else layer.base.dequantize()
    return weight.detach().float().to(layer.lora_A.device)


def low_rank(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with B·A the best rank-r approximation of ``matrix``, √S on both sides."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]
