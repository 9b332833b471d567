"""Built-in evaluators: one module per method; each registers through the public hooks."""
