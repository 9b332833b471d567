"""Built-in plugins, registered exactly as third-party packages register theirs."""
