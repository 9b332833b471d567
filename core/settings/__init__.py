"""A run's settings as plain data (no torch): ``RunConfig``/``TrainConfig``, their ranges and the
YAML/flag merge (:mod:`.config`), and ``qpeft run``'s flags as data with their parser (:mod:`.flags`).

A room of ``core/`` (docs/architecture.md): imports only itself and the rooms below it."""
