"""The three plugin kinds and what their plugins build on: the Quantizer and ``QuantizedLinear``,
the Evaluator, the Adapter with its layer and method bases, the low-rank core, and adapters in
PEFT's file format.

A room of ``core/`` (docs/architecture.md): imports only itself and the rooms below it."""
