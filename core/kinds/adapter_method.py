"""The method base every adapter method plugin builds on: attach layers, save, load, merge.

Saving and loading go through PEFT's file format (:mod:`qpeft.core.kinds.peft_format`), which
itself only knows the :class:`~qpeft.core.kinds.adapter_layers.AdapterLayer` interface; this
module sits above both, so neither imports it.
"""
from typing import ClassVar

import torch
from torch import nn

from qpeft.core.kinds import peft_format
from qpeft.core.kinds.adapter import Adapter
from qpeft.core.kinds.adapter_layers import AdapterLayer, adapter_layers, find_targets, mark_trainable, merge_model
from qpeft.core.kinds.quantizer import QuantizedLinear


class AdapterMethod(Adapter):
    """A method plugin: attaches layers and saves, loads and merges them.

    Subclasses implement :meth:`wrap` (one target layer → its adapter layer) and
    :meth:`peft_config`; the attach loop, saving, loading and merging only use the
    :class:`AdapterLayer` interface, so they are shared.
    """

    role = "method"
    peft_type: ClassVar[str] = ""

    def __init__(self, options=None, **values):
        super().__init__(options, **values)
        self.modifiers: list = []     # the modifiers it was attached with (set by attach)
        self.calibration: dict = {}   # part name → what its calibrate() returned (saved with the adapter)

    def attach(self, model: nn.Module, modifiers: list) -> None:
        """Replace every layer ``options.targets`` names (:func:`find_targets`) by
        :meth:`wrap`'s layer, then leave only the adapter tensors trainable — the one attach
        loop (a method that needs more, e.g. linking layers, extends it and calls super)."""
        for name, parent, attr, base in find_targets(model, self.options.targets, f"adapter '{self.name}'"):
            setattr(parent, attr, self.wrap(name, base, modifiers))
        self.modifiers = list(modifiers)
        mark_trainable(model)

    def wrap(self, name: str, base: QuantizedLinear, modifiers: list) -> AdapterLayer:
        """The adapter layer for the target layer ``base`` named ``name``."""
        raise NotImplementedError(f"adapter '{self.name}' defines neither wrap() nor attach()")

    def peft_config(self, model: nn.Module) -> dict:
        """Method-specific ``adapter_config.json`` fields (``peft_type`` and the rest)."""
        raise NotImplementedError

    def restore_calibration(self, model: nn.Module, states: dict) -> None:
        """Give each part (this method, then its modifiers) the calibration state it returned
        (``{part name: {key: tensor}}``) through ``apply_calibration``, and keep the states, which
        :meth:`save` writes beside the adapter."""
        from qpeft.core.base.errors import QpeftError

        parts = {part.name: part for part in [self, *self.modifiers]}
        unknown = sorted(set(states) - set(parts))
        if unknown:
            raise QpeftError(f"calibration state of '{unknown[0]}', which is not part of adapter "
                             f"'{'+'.join(parts)}'; load it with the adapter it was made for")
        for name, state in states.items():
            parts[name].apply_calibration(model, state)
        self.calibration = dict(states)

    def save(self, model: nn.Module, directory, meta: dict | None = None) -> None:
        """Write the adapter in PEFT's format plus ``qpeft_adapter.json`` (see qpeft.core.kinds.peft_format),
        and the calibration states, if any, in ``qpeft_calibration.safetensors``."""
        peft_format.save(model, directory, self.peft_config(model),
                         [self, *self.modifiers], meta or {}, calibration=self.calibration)

    def load(self, model: nn.Module, directory) -> None:
        """Attach (with the saved modifiers) if needed, apply the saved calibration states,
        then load the saved tensors exactly.

        Init modifiers run again on attach (they are deterministic), so a base weight they
        rewrote is rebuilt before the trained tensors are copied in; a data-driven init (EVA)
        is rebuilt from its saved calibration state, with no data.
        """
        if not adapter_layers(model):
            self.attach(model, peft_format.saved_modifiers(directory))
        states = peft_format.read_calibration(directory)
        if states:
            self.restore_calibration(model, states)
        peft_format.load_tensors(model, directory)

    def merge(self, model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
        """Fold the adapter in: a plain full-precision transformers model (in place)."""
        return merge_model(model, dtype)
