"""The plugin system: the hook specifications, the ``Plugin`` base, discovery and lookups
(the registry), and building one plugin from a spec.

A room of ``core/`` (docs/architecture.md): imports only itself and the rooms below it."""
