"""The fuzzer of every decoder a peer reaches (``bench/fuzz.py``).

- :mod:`.core`: targets, outcomes, crashes, the per-input guard (time, memory);
- :mod:`.mutate`: byte-level and JSON-level mutations, shared by the targets;
- :mod:`.t_transport`, :mod:`.t_control`, :mod:`.t_storage`, :mod:`.t_nbd`,
  :mod:`.t_memory`: one module per decoder family, each a list of :class:`.core.Target`;
- :mod:`.engine`: the seeded mutation engine (always there) and the coverage-guided one
  (atheris, when installed: ``pip install -e '.[fuzz]'``).

Every module imports relatively, so the package works both as ``fuzzing`` (``bench/`` on
``sys.path``, as when ``bench/fuzz.py`` runs) and as ``bench.fuzzing`` (the tests).
"""
