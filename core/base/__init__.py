"""What every room may use and that knows no other room: user errors, plugin options, the spec
grammar, the version, durable writes, run directories on disk (names, lock, staging), progress bars.

A room of ``core/`` (docs/architecture.md): imports only itself and the rooms below it."""
