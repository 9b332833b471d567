"""qpeft's core: plugin kinds, discovery, model loading and the pipeline.

Read top to bottom: hookspecs → plugin → registry → models → quantizer/adapter/evaluator
interfaces → data → trainer → pipeline → cli; testing and conformance hold the tiny model
and the kit that checks a plugin the way the built-ins are checked.
"""
