"""qpeft's core: plugin kinds, discovery, model loading and the pipeline.

Read top to bottom: hookspecs → plugin → registry → models → quantizer/adapter/evaluator
interfaces → data → trainer → pipeline → cli.
"""
