"""rsLoRA — Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA"
(arXiv:2312.03732).

A modifier of the ``"scaling"`` slot: s = α/√r instead of α/r. With α/r the update's
magnitude collapses as r grows, so large ranks learn no better than small ones; α/√r is
the scaling under which the learning trajectory is rank-stable (§3, Theorem 3.2).

    lora+rslora      dora:r=64+rslora
"""
import math

from qpeft import Adapter, hookimpl


class RsLoRA(Adapter):
    name = "rslora"
    description = "rsLoRA: scale the low-rank update by α/√r instead of α/r (Kalajdzievski 2023)"
    role = "modifier"
    modifies = "scaling"

    def scaling(self, r: int, alpha: float) -> float:
        """s = α/√r (Kalajdzievski 2023, §3, Theorem 3.2)."""
        return alpha / math.sqrt(r)

    def update_peft_config(self, config: dict) -> None:
        """PEFT's name for the same rule."""
        config["use_rslora"] = True

    @classmethod
    def from_peft_config(cls, config: dict) -> dict | None:
        """Taken when a PEFT config sets ``use_rslora``."""
        return {} if config.get("use_rslora") else None


@hookimpl
def register_adapters(register):
    register(RsLoRA)
