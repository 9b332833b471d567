"""The conformance kit (``qpeft.testing``): checks a quantizer, adapter or evaluator the way the
built-ins are checked, on the tiny model; it never imports the pipeline.

A room of ``core/`` (docs/architecture.md): imports only itself and the rooms below it."""
