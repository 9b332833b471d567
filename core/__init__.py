"""qpeft's core, in rooms: one sub-package each, importing only itself and the rooms below it
(docs/architecture.md, "The rooms of core/"; tests/test_layering.py holds the rule).

Read bottom up: base → plugin, settings → kinds, dataset → model, train → interop, kit → run →
compare → cli. That is the pipeline: settings and plugins, the three kinds and the data, the
model and the training loop, a run, a comparison of runs, the commands. The modules directly
here are deprecated aliases of old paths (CHANGELOG.md).
"""
