"""Training data: examples read from files or the bundled set, prompt templates and label
masking, batches.

A room of ``core/`` (docs/architecture.md): imports only itself and the rooms below it."""
