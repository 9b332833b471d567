"""Comparing runs: the quantizer × adapter grid, its metrics, tables, edge score and plots, and
the merged and re-quantized export with its quality cost.

A room of ``core/`` (docs/architecture.md): imports only itself and the rooms below it."""
