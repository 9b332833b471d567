"""Models: resolving and checking a model spec, the GGUF cache, the streaming quantized load, the
tiny random Llama, greedy generation.

A room of ``core/`` (docs/architecture.md): imports only itself and the rooms below it."""
