"""Built-in quantizers: one module per method; each registers through the public hooks."""
