"""A run: its record (``config.json``), the pipeline's stages, the report, a finished run rebuilt.

A room of ``core/`` (docs/architecture.md): imports only itself and the rooms below it."""
