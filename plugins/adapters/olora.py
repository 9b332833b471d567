"""OLoRA — Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models"
(arXiv:2406.01775).

A modifier of the ``"init"`` slot: start A and B from the QR decomposition of the frozen
weight instead of (Kaiming, zero), and move that part out of the base so the adapted
model still starts equal to the original one (§3, Eqs. 2–4)::

    W = Q·R                      Q (out×k) orthonormal columns, R (k×in) upper triangular
    B = Q[:, :r]   A = R[:r]     (the same split as PEFT's ``init_lora_weights="olora"``)
    base ← quant(W − s·B·A)      re-quantized through the quantizer's set_weight

    lora+olora      dora:r=8+olora      lora+olora+rslora

Saving: the adapter is stored relative to the rewritten base, and ``adapter_config.json``
says ``init_lora_weights: "olora"``, so ``PeftModel.from_pretrained`` reruns the same QR on the
base it is given: on the original full-precision model that is qpeft's model over ``none``
(tests/test_peft_conversion_inits.py; s·Q_r·R_r does not depend on the signs QR picks), and
on a bitsandbytes nf4 base PEFT dequantizes, factors and re-quantizes as qpeft's nf4 does. A
rank-2r LoRA over the original W (CorDA's ``peft_tensors``) would be exact over ``none`` too,
but over nf4 it is Q(W) + ΔW, not Q(Ŵ − s·B₀·A₀) + s·B·A; the rerun is kept.
"""
import torch

from qpeft import Adapter, OptionsError, hookimpl


class OLoRA(Adapter):
    name = "olora"
    description = "OLoRA: initialise B, A from the QR decomposition of W; base ← W − s·B·A (Büyükakyüz 2024)"
    role = "modifier"
    modifies = "init"
    peft_note = ("OLoRA rewrote the base to quant(Ŵ − s·B₀·A₀) from the QR of the base it held: PEFT reruns that QR "
                 "(\"olora\") on the base it is given, qpeft's model over none and over bitsandbytes nf4 with double "
                 "quantization (qpeft's nf4; SmolLM2-135M: ppl 125.0 against 125.2); over a full-precision or "
                 "dequantized base when qpeft's was quantized it is another model (153 against 125, docs/adapters.md): "
                 "load it with qpeft (qpeft eval, qpeft.load_adapter) or ship the merged model: qpeft export RUN --merge")

    @torch.no_grad()
    def initialize(self, layer, scaling: float) -> None:
        """B = Q[:, :r], A = R[:r] with W = Q·R; the base keeps W − s·B·A (§3)."""
        weight = layer.base.dequantize().to(layer.lora_A.device)
        r = layer.lora_A.shape[0]
        if r > min(weight.shape):
            raise OptionsError(f"olora needs r ≤ {min(weight.shape)} for a {weight.shape[0]}×{weight.shape[1]} "
                               f"layer; lower r")
        q, rr = torch.linalg.qr(weight)
        layer.lora_B.copy_(q[:, :r])
        layer.lora_A.copy_(rr[:r])
        layer.set_base_weight(weight - scaling * (q[:, :r] @ rr[:r]))

    def update_peft_config(self, config: dict) -> None:
        """PEFT re-runs the same decomposition on load when told so."""
        config["init_lora_weights"] = "olora"

    @classmethod
    def from_peft_config(cls, config: dict) -> dict | None:
        """Taken for ``init_lora_weights: "olora"``: PEFT rewrote the base with the same
        decomposition, which loading runs again before the tensors are copied in."""
        return {} if config.get("init_lora_weights") == "olora" else None


@hookimpl
def register_adapters(register):
    register(OLoRA)
