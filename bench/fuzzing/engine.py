"""The two engines.

- ``mutation`` (always there): one process, every target in turn (round robin) until each
  has had its share of ``--inputs`` or ``--seconds`` ran out. Per target, a pool starts
  with the seeds; each input is a parent from the pool mutated structure-aware (the
  target's own mutator) or at the byte level (then repaired by the target's ``fixup``
  most of the time, so it reaches past checksums); an input with an outcome not seen before
  joins the pool. Randomness: one ``random.Random`` per target, from ``--seed`` and the
  target's name, so a target's inputs do not depend on which others run.
- ``atheris`` (coverage-guided, when atheris is installed): one process per target, run one
  after another, each libFuzzer with xmig's modules instrumented, the seeds as its corpus,
  and a custom mutator that mixes libFuzzer's byte-level mutations (repaired by ``fixup``)
  with the target's structure-aware one. The nasty inputs run first, outside libFuzzer.

Both run every input through :class:`~.core.Recorder` inside :func:`~.core.guarded`.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .core import DecoderStats, Recorder, Target, guarded, max_rss_mb
from .mutate import bytes_mutation

#: every target's name, and the module that defines it
NAMES: dict[str, str] = {
    "frames": "t_transport", "hello": "t_transport", "welcome": "t_transport",
    "session": "t_transport", "control": "t_control", "storage_wire": "t_storage",
    "storage_apply": "t_storage", "nbd": "t_nbd", "page_codec": "t_memory",
    "ramcheck_fixups": "t_memory", "ramcheck_digests": "t_memory", "ramcheck_chunks": "t_memory",
}
POOL = 512  #: inputs kept per target (seeds and inputs with new outcomes)
#: libFuzzer's longest input: its corpus is held in memory, and grows with coverage (the
#: longer nasty inputs run before libFuzzer starts)
ATHERIS_MAX_LEN = 1 << 16


def select(only: str | None) -> list[str]:
    """Target names for ``--only`` (comma-separated names or prefixes: ``ramcheck``)."""
    if not only:
        return list(NAMES)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    names = [n for n in NAMES if any(n == w or n.startswith(w) for w in wanted)]
    if not names:
        raise SystemExit(f"--only {only!r} names no target; targets: {', '.join(NAMES)}")
    return names


def load(names: Sequence[str]) -> tuple[list[Target], dict[str, str]]:
    """The targets named (and, per module that would not import, why)."""
    targets: list[Target] = []
    errors: dict[str, str] = {}
    for mod in dict.fromkeys(NAMES[n] for n in names):
        try:
            module = importlib.import_module(f".{mod}", __package__)
        except Exception as err:  # a module being rewritten: say so, fuzz the others
            errors[mod] = f"{type(err).__name__}: {err}"
            continue
        targets += [t for t in module.TARGETS if t.name in names]
    return targets, errors


def quotas(names: Sequence[str], total: int) -> dict[str, int]:
    """``total`` inputs split evenly over ``names``."""
    base, extra = divmod(total, len(names))
    return {n: base + (k < extra) for k, n in enumerate(names)}


@dataclass
class _Pool:
    target: Target
    rng: random.Random
    inputs: list[bytes] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    queue: list[bytes] = field(default_factory=list)  #: nasty inputs and seeds, run first

    def next(self) -> bytes:
        if self.queue:
            return self.queue.pop()
        t, rng = self.target, self.rng
        parent = rng.choice(self.inputs)
        if t.mutate is not None and rng.random() < 0.6:
            data = t.mutate(parent, rng)
        else:
            data = bytes_mutation(parent, rng, self.inputs, t.max_len)
            if t.fixup is not None and rng.random() < 0.8:
                data = t.fixup(data)
        return data[:t.max_len]

    def keep(self, data: bytes, outcome: str | None) -> None:
        """An input with a new outcome joins the pool (and one in 256 others, for variety)."""
        if outcome is None or (outcome in self.seen and self.rng.random() >= 1 / 256):
            return
        self.seen.add(outcome)
        if len(self.inputs) < POOL:
            self.inputs.append(data)
        else:
            self.inputs[self.rng.randrange(POOL)] = data


def run_mutation(targets: Sequence[Target], share: dict[str, int], deadline: float,
                 seed: int, rec: Recorder) -> None:
    """The mutation engine."""
    pools = []
    for t in targets:
        seeds = t.seeds()
        p = _Pool(t, random.Random(f"{seed}:{t.name}"), list(seeds))
        p.queue = [*reversed(seeds), *reversed(t.nasty())]
        pools.append(p)
    left = {t.name: share[t.name] for t in targets}
    while pools and time.monotonic() < deadline:
        for p in list(pools):
            try:
                data = p.next()
            except Exception as err:  # a bug of the fuzzer's mutator, not of xmig
                if os.environ.get("XMIG_FUZZ_DEBUG"):
                    raise
                rec.mutator_failed(p.target.name, err)
                data = bytes_mutation(p.rng.choice(p.inputs), p.rng, (), p.target.max_len)
            p.keep(data, rec.run(p.target, data))
            left[p.target.name] -= 1
            if left[p.target.name] <= 0:
                pools.remove(p)


# -- atheris ---------------------------------------------------------------------------------


def run_atheris(names: Sequence[str], share: dict[str, int], deadline: float, seed: int,
                rec: Recorder, fuzz_py: Path) -> dict[str, str]:
    """One worker process per target, one after another, each given the time left divided
    by the targets left; returns per target why a worker failed, if one did."""
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="xmig-fuzz-") as tmp:
        for k, name in enumerate(names):
            left = max(1.0, (deadline - time.monotonic()) / (len(names) - k))
            out, err_path = Path(tmp, f"{name}.json"), Path(tmp, f"{name}.err")
            cmd = [sys.executable, str(fuzz_py), "--worker", name, "--inputs",
                   str(share[name]), "--seconds", f"{left:.1f}", "--seed", str(seed),
                   "--worker-out", str(out)]
            with open(err_path, "wb") as err:
                proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                      timeout=left + 120, check=False)
            try:
                part = json.loads(out.read_text())
            except (OSError, ValueError):
                tail = err_path.read_bytes()[-2000:].decode(errors="replace")
                failures[name] = f"worker exited {proc.returncode}: {tail}"
                continue
            rec.merge(part["recorder"])
    return failures


def atheris_worker(name: str, n: int, seconds: float, seed: int, out: Path) -> None:
    """Inside a worker process: fuzz ``name`` with libFuzzer, write the figures to ``out``
    (every few seconds, and when done), then leave (libFuzzer never returns)."""
    import atheris

    with atheris.instrument_imports(include=["xmig"]):
        targets, errors = load([name])
    if not targets:
        raise SystemExit(f"{name} did not load: {errors}")
    (target,) = targets
    rec = Recorder()
    deadline = time.monotonic() + seconds
    last = [time.monotonic()]
    stack = ExitStack()

    def dump(done: bool) -> None:
        rec.stats.setdefault(name, DecoderStats()).rss_mb = max_rss_mb()
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"recorder": rec.as_json(), "done": done}))
        os.replace(tmp, out)
        if done:
            stack.close()
            atexit._run_exitfuncs()  # the targets' temporary files: os._exit skips them
            os._exit(0)

    def one(data: bytes) -> None:
        rec.run(target, data)
        now = time.monotonic()
        if rec.inputs >= n or now >= deadline:
            dump(True)
        if now - last[0] > 2:
            last[0] = now
            dump(False)

    def mutate(data: bytes, max_size: int, s: int) -> bytes:
        rng = random.Random(s)
        try:
            if target.mutate is not None and rng.random() < 0.5:
                return target.mutate(data, rng)[:max_size]
            data = atheris.Mutate(data, max_size)
            return target.fixup(data)[:max_size] if target.fixup and rng.random() < 0.8 else data
        except Exception as err:  # a bug of the fuzzer's mutator: libFuzzer's instead
            rec.mutator_failed(name, err)
            return bytes(atheris.Mutate(data, max_size))

    stack.enter_context(guarded())
    for data in target.nasty():
        rec.run(target, data)
    corpus = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"xmig-fuzz-{name}-"))
    for k, data in enumerate(target.seeds()):
        Path(corpus, f"seed{k}").write_bytes(data)
    lib_seed = random.Random(f"{seed}:{name}").randrange(1, 1 << 31)
    flags = [f"-seed={lib_seed}", f"-max_len={min(target.max_len, ATHERIS_MAX_LEN)}",
             "-timeout=0",
             "-rss_limit_mb=2048", "-print_final_stats=0"]
    if seconds < 1e9:  # a backstop: the worker stops itself at its deadline
        flags.append(f"-max_total_time={int(seconds) + 30}")
    atheris.Setup([sys.argv[0], *flags, corpus], one, custom_mutator=mutate)
    atheris.Fuzz()
    dump(True)  # pragma: no cover -- libFuzzer exits before


def versions(engine: str) -> dict[str, str]:
    import platform

    import numpy
    import zstandard

    from xmig import __version__

    out = {"python": platform.python_version(), "xmig": __version__, "numpy": numpy.__version__,
           "zstandard": zstandard.__version__}
    for mod in ("msgspec", "atheris") if engine == "atheris" else ("msgspec",):
        try:
            from importlib.metadata import version

            out[mod] = version(mod)
        except Exception:
            continue
    return out


def report(rec: Recorder, *, engine: str, seed: int, seconds: float,
           errors: dict[str, str]) -> dict[str, Any]:
    part = rec.as_json()
    return {
        "engine": engine, "inputs": rec.inputs, "per_decoder": part["per_decoder"],
        "crashes": rec.crashes, "crash_examples": part["crash_examples"],
        "crash_kinds": part["crash_kinds"],
        "max_rss_mb": round(max([max_rss_mb(), *(s.rss_mb for s in rec.stats.values())]), 1),
        "seconds": round(seconds, 2), "inputs_per_second": round(rec.inputs / seconds)
        if seconds else 0, "seed": seed, "versions": versions(engine),
        "limits": {"slow_s": rec.slow_s, "alarm_s": rec.alarm_s,
                   "mem_step_mb": rec.mem_step_kb // 1024, "address_space_extra_mb": 768},
        "mutator_errors": part["mutator_errors"], "errors": errors,
    }
