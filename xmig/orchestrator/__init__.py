"""xmig.orchestrator: the one engine that drives every guest backend through a migration.

- :mod:`xmig.orchestrator.source` — the source's side: negotiate, brownout, blackout, the
  commit, the abort; a backend implements :class:`xmig.guest.backend.SourceBackend`.
- :mod:`xmig.orchestrator.destination` — the destination's side: prepare, receive, READY,
  GO, discard or hold in doubt; a backend implements :class:`xmig.guest.backend.DestBackend`.
"""
