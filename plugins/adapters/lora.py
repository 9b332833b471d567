"""LoRA — Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685).

The ``lora`` method plugin: :class:`qpeft.LowRankMethod` under its name, as a third-party
method would write it. The layer (``h = Ŵx + s·B·A·dropout(x)``, §4.1, Eq. 3), its
initialisation and the scaling and init slots live in :mod:`qpeft.core.kinds.lowrank`.
"""
from qpeft import (LoRALinear, LoRAOptions, LowRankMethod, LowRankOptions,  # noqa: F401  (old import path)
                   adapter_layers, add_low_rank, find_targets, hookimpl, low_rank_values, merge_model)


class LoRA(LowRankMethod):
    """The ``lora`` method."""

    name = "lora"
    description = "LoRA: a trainable low-rank update s·B·A beside each frozen layer (Hu et al. 2021)"

    @classmethod
    def from_peft_config(cls, config: dict) -> dict | None:
        """Options for a PEFT LoRA adapter (``peft_type`` LORA, ``use_dora`` false)."""
        if config.get("peft_type") != "LORA" or config.get("use_dora"):
            return None
        return low_rank_values(config)


@hookimpl
def register_adapters(register):
    register(LoRA)
