"""Built-in adapters: one module per method; each registers through the public hooks."""
