"""Fuzz every decoder a peer reaches; print one JSON object.

    python bench/fuzz.py --json --inputs 1000000                  # the full run
    python bench/fuzz.py --json --seconds 20 --engine mutation    # the test suite's run
    python bench/fuzz.py --json --inputs 50000 --only control,nbd

Decoders (``--only`` takes names or prefixes, comma-separated): frames, hello, welcome,
session, control, storage_wire, storage_apply, nbd, page_codec, ramcheck_fixups,
ramcheck_digests, ramcheck_chunks. Engines: ``atheris`` (coverage-guided, when installed:
``pip install -e '.[fuzz]'``), ``mutation`` (seeded, structure-aware); ``auto`` picks
atheris when it imports. Exit status 1 when there was a crash (or a target did not load).
See bench/README.md ("fuzz.py") for the keys.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fuzzing.core import Recorder, guarded
from fuzzing.engine import (
    atheris_worker,
    load,
    quotas,
    report,
    run_atheris,
    run_mutation,
    select,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the JSON report (the default "
                   "prints it too, indented)")
    p.add_argument("--inputs", type=int, default=100_000, help="inputs in all, split evenly "
                   "over the decoders (default 100000)")
    p.add_argument("--seconds", type=float, default=None,
                   help="stop after this long, whatever --inputs says")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--only", default=None, help="decoders: names or prefixes, comma-separated")
    p.add_argument("--engine", choices=("auto", "atheris", "mutation"), default="auto")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _engine(choice: str) -> str:
    if choice != "auto":
        return choice
    try:
        import atheris  # noqa: F401
    except ImportError:
        return "mutation"
    return "atheris"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seconds = args.seconds if args.seconds is not None else float("inf")
    if args.worker:
        atheris_worker(args.worker, args.inputs, seconds, args.seed, args.worker_out)
        return 0
    engine = _engine(args.engine)
    names = select(args.only)
    share = quotas(names, args.inputs)
    rec = Recorder()
    t0 = time.monotonic()
    deadline = t0 + seconds
    if engine == "atheris":
        errors = run_atheris(names, share, deadline, args.seed, rec, Path(__file__).resolve())
    else:
        targets, errors = load(names)
        with guarded():
            run_mutation(targets, share, deadline, args.seed, rec)
    out = report(rec, engine=engine, seed=args.seed, seconds=time.monotonic() - t0,
                 errors=errors)
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    return 1 if out["crashes"] or errors else 0


if __name__ == "__main__":
    sys.exit(main())
