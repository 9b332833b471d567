"""The one training loop and its building blocks: optimizers and schedules, loss, the lean MLP
form, checkpoints, memory facts, data parallel, the plugins' training hooks.

A room of ``core/`` (docs/architecture.md): imports only itself and the rooms below it."""
