"""Other tools' files: a foreign PEFT adapter read and recognised, an adapter directory's files,
GGUF export.

A room of ``core/`` (docs/architecture.md): imports only itself and the rooms below it."""
