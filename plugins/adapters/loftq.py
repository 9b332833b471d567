"""LoftQ — Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models"
(arXiv:2310.08659).

A modifier of the ``"init"`` slot: choose the quantized base Q and the initial B, A
together so that Q + s·B·A is close to the full-precision W, instead of starting from
quant(W) and B = 0 (§2.2, Algorithm 1). Alternating T times::

    Q_t      = quant(W − s·B_{t−1}·A_{t−1})                      (Eq. 6; B_0·A_0 = 0)
    U·S·Vᵀ   = SVD((W − dequant(Q_t)) / s),  rank r              (Eq. 7)
    B_t      = U_r·√S_r      A_t = √S_r·V_rᵀ

It uses only the quantizer's ``set_weight``/``dequantize``, so it works for any
quantizer and on CPU.

The full-precision W: the quantizer has already replaced it by Ŵ = dequant(quant(W)).
LoftQ reads ``layer.base.source_weight`` when the pipeline kept the original weight
there (see docs/adapters.md); without it it starts from Ŵ, which an idempotent quantizer
(NF4, HQQ) reproduces exactly — the residual is then 0 and LoftQ refuses, since B = A = 0
could not train.

    lora+loftq      dora:r=16+loftq:iters=5
"""
import dataclasses

import torch

from qpeft import Adapter, QpeftError, hookimpl, option
from qpeft.plugins.adapters._svd import low_rank, source_weight


@dataclasses.dataclass
class LoftQOptions:
    iters: int = option(1, "alternating steps T of Algorithm 1 (PEFT's loftq_iter defaults to 1)")

    def __post_init__(self):
        if self.iters < 1:
            raise ValueError(f"iters must be at least 1, got {self.iters}")


class LoftQ(Adapter):
    name = "loftq"
    description = "LoftQ: choose quantized W and initial B, A jointly so Q + s·B·A ≈ W (Li et al. 2023)"
    role = "modifier"
    modifies = "init"
    needs_source_weights = True
    Options = LoftQOptions
    peft_note = ("LoftQ's base is the quantizer's Q(W − s·B·A) of its last step and the PEFT files a plain LoRA: "
                 "with loftq:iters=1 that base is quant(W), so PEFT over bitsandbytes nf4 of W with double "
                 "quantization gives qpeft's model (SmolLM2-135M: ppl 82.57 against 82.60); with more steps, another "
                 "quantizer or a full-precision base it is another model (iters=4 over bnb nf4: +17 %, "
                 "docs/adapters.md): load it with qpeft (qpeft eval, qpeft.load_adapter) or ship the merged model: "
                 "qpeft export RUN --merge")

    @torch.no_grad()
    def initialize(self, layer, scaling: float) -> None:
        """Algorithm 1 of Li et al. 2023 for one layer; leaves Q in ``layer.base``."""
        weight = source_weight(layer)
        r = layer.lora_A.shape[0]
        b = torch.zeros_like(layer.lora_B, dtype=torch.float32)
        a = torch.zeros_like(layer.lora_A, dtype=torch.float32)
        for _ in range(self.options.iters):
            layer.set_base_weight(weight - scaling * (b @ a))                          # Eq. 6
            b, a = low_rank((weight - layer.base.dequantize().to(weight.device)) / scaling, r)  # Eq. 7
        if not b.abs().sum() > 0:
            raise QpeftError("loftq has nothing to correct: the quantized weights equal the "
                             "full-precision ones (as with --quant none); use loftq over a lossy "
                             "quantizer such as nf4 or hqq, or drop '+loftq'")
        layer.lora_B.copy_(b)
        layer.lora_A.copy_(a)


@hookimpl
def register_adapters(register):
    register(LoftQ)
