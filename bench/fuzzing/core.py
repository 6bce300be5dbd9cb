"""Targets, outcomes and crashes, and the guard every input runs under.

An *outcome* is the class of what a decoder did with an input: the type of the value it
decoded (a label the target returns), or the name of the :class:`~xmig.errors.XmigError`
subclass it raised. A *crash* is anything else: an exception that is not an ``XmigError``
(``RecursionError``, ``MemoryError``, ``IndexError``, ``struct.error``, ...), an input that
took longer than :attr:`Recorder.slow_s`, one during which the process's peak RSS grew by
more than :attr:`Recorder.mem_step_mb`, or a target's own property check failing (a
decoder that raised a typed error *and* changed its state: :class:`ChangedOnError`).
"""

from __future__ import annotations

import os
import random
import resource
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from xmig.errors import XmigError

Mutator = Callable[[bytes, random.Random], bytes]


class InputTimeout(Exception):
    """Raised by the SIGALRM handler inside an input that runs too long (not an XmigError:
    it counts as a crash)."""


class ChangedOnError(Exception):
    """A target's check: the decoder raised a typed error but changed its state (the house
    rule is that a bad input changes nothing)."""


class SlowInput(Exception):
    """An input that completed, but took longer than the guard allows."""


class ExcessiveMemory(Exception):
    """An input during which the process's peak RSS grew by more than the guard allows."""


def _no_nasty() -> list[bytes]:
    return []


@dataclass(frozen=True)
class Target:
    """One decoder a peer reaches.

    ``run`` decodes one input and returns a label of what it decoded (it raises what the
    decoder raises); ``seeds`` are valid encodings made with the module's own encoders;
    ``mutate`` is the structure-aware mutation (it may return the input's bytes mutated at
    the byte level when they no longer parse); ``fixup`` repairs checksums and lengths after
    a blind byte-level mutation, so it reaches past the checksum check; ``nasty`` are the
    hand-made worst cases (deep nesting, huge counts), run first in every run.
    """

    name: str
    run: Callable[[bytes], str]
    seeds: Callable[[], list[bytes]]
    mutate: Mutator | None = None
    fixup: Callable[[bytes], bytes] | None = None
    nasty: Callable[[], list[bytes]] = _no_nasty
    max_len: int = 1 << 16


@dataclass
class Crash:
    decoder: str
    type: str
    message: str
    where: str  #: the innermost xmig frame of the traceback (file:line)
    input_hex: str  #: the first 200 bytes
    input_len: int

    def as_json(self) -> dict[str, Any]:
        return {"decoder": self.decoder, "type": self.type, "message": self.message,
                "where": self.where, "input_hex": self.input_hex, "input_len": self.input_len}


@dataclass
class DecoderStats:
    inputs: int = 0
    crashes: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0  #: spent in the decoder (the guard's clock)
    slowest: float = 0.0  #: the slowest input, seconds
    rss_mb: float = 0.0  #: peak RSS of the worker process that ran it alone (atheris)

    def as_json(self) -> dict[str, Any]:
        out = {"inputs": self.inputs, "outcomes": len(self.outcomes), "crashes": self.crashes,
               "outcome_counts": dict(sorted(self.outcomes.items())),
               "seconds": round(self.seconds, 2), "slowest_ms": round(self.slowest * 1e3, 1)}
        if self.rss_mb:
            out["max_rss_mb"] = round(self.rss_mb, 1)
        return out

    def merge(self, other: dict[str, Any]) -> None:
        self.inputs += int(other["inputs"])
        self.crashes += int(other["crashes"])
        self.seconds += float(other["seconds"])
        self.slowest = max(self.slowest, float(other["slowest_ms"]) / 1e3)
        self.rss_mb = max(self.rss_mb, float(other.get("max_rss_mb", 0.0)))
        for name, n in other["outcome_counts"].items():
            self.outcomes[name] = self.outcomes.get(name, 0) + int(n)


def _where(err: BaseException) -> str:
    """The innermost traceback frame in xmig's code (else the innermost at all); for a
    failed check, in the exception it caught."""
    if isinstance(err, ChangedOnError) and err.__cause__ is not None:
        err = err.__cause__
    frames = traceback.extract_tb(err.__traceback__)
    for fr in reversed(frames):
        if f"{os.sep}xmig{os.sep}" in fr.filename:
            tail = fr.filename.rsplit(f"{os.sep}xmig{os.sep}", 1)[1]
            return f"xmig/{tail}:{fr.lineno}"
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


def max_rss_mb() -> float:
    """Peak RSS of this process since exec, MiB, from ``VmHWM``: ``getrusage`` keeps the
    peak across fork and exec (for children too), so a fuzzer started by a big process
    (pytest late in a whole run) would report its parent's size. Workers report their own
    (``per_decoder``)."""
    return _vm_hwm_kib() / 1024


_status: list[int] = []  #: an open /proc/self/status, read again with pread (about 5 us)


def _vm_hwm_kib() -> int:
    try:
        if not _status:
            _status.append(os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC))
        text = os.pread(_status[0], 8192, 0)
        at = text.index(b"VmHWM:") + 6
        return int(text[at:text.index(b"kB", at)])
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class Recorder:
    """Runs inputs under the guard and keeps the per-decoder figures and crash examples."""

    def __init__(self, *, slow_s: float = 1.0, alarm_s: float = 10.0,
                 mem_step_mb: float = 200.0, max_examples: int = 20) -> None:
        self.slow_s = slow_s
        self.alarm_s = alarm_s
        self.mem_step_kb = int(mem_step_mb * 1024)
        self.max_examples = max_examples
        self.stats: dict[str, DecoderStats] = {}
        self.examples: list[Crash] = []
        self.kinds: dict[str, int] = {}  #: "decoder: Type at where" -> crashes
        #: the fuzzer's own mutators failing ("decoder: Type at where" -> times): a bug of
        #: the fuzzer, not of xmig (the parent then went through a byte-level mutation)
        self.mutator_errors: dict[str, int] = {}

    @property
    def inputs(self) -> int:
        return sum(s.inputs for s in self.stats.values())

    @property
    def crashes(self) -> int:
        return sum(s.crashes for s in self.stats.values())

    def run(self, target: Target, data: bytes) -> str | None:
        """Run one input; its outcome, or None for a crash."""
        st = self.stats.setdefault(target.name, DecoderStats())
        st.inputs += 1
        rss0 = _vm_hwm_kib()  # not getrusage: its peak may be a parent's, from before exec
        t0 = time.perf_counter()
        err: BaseException | None = None
        outcome = ""
        try:
            signal.setitimer(signal.ITIMER_REAL, self.alarm_s)
            try:
                outcome = target.run(data)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except XmigError as e:
            outcome = type(e).__name__
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            err = e
        took = time.perf_counter() - t0
        st.seconds += took
        st.slowest = max(st.slowest, took)
        if err is None and took > self.slow_s:
            err = SlowInput(f"{outcome} after {took:.2f} s")
        grew = _vm_hwm_kib() - rss0
        if err is None and grew > self.mem_step_kb:
            err = ExcessiveMemory(f"{outcome}: peak RSS grew by {grew // 1024} MiB")
        if err is not None:
            self._crash(target.name, st, err, data)
            return None
        st.outcomes[outcome] = st.outcomes.get(outcome, 0) + 1
        return outcome

    def _crash(self, name: str, st: DecoderStats, err: BaseException, data: bytes) -> None:
        st.crashes += 1
        where = _where(err)
        kind = f"{name}: {type(err).__name__} at {where}"
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if self.kinds[kind] == 1 and len(self.examples) < self.max_examples:
            self.examples.append(Crash(name, type(err).__name__, str(err)[:300], where,
                                       data[:200].hex(), len(data)))

    def mutator_failed(self, name: str, err: Exception) -> None:
        frames = traceback.extract_tb(err.__traceback__)
        where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"
        kind = f"{name}: {type(err).__name__} at {where}"
        self.mutator_errors[kind] = self.mutator_errors.get(kind, 0) + 1

    def as_json(self) -> dict[str, Any]:
        return {
            "per_decoder": {k: v.as_json() for k, v in sorted(self.stats.items())},
            "crash_examples": [c.as_json() for c in self.examples],
            "crash_kinds": dict(sorted(self.kinds.items())),
            "mutator_errors": dict(sorted(self.mutator_errors.items())),
        }

    def merge(self, part: dict[str, Any]) -> None:
        """Add a worker's :meth:`as_json` to this one."""
        for name, st in part["per_decoder"].items():
            self.stats.setdefault(name, DecoderStats()).merge(st)
        for kind, n in part["crash_kinds"].items():
            self.kinds[kind] = self.kinds.get(kind, 0) + int(n)
        for kind, n in part["mutator_errors"].items():
            self.mutator_errors[kind] = self.mutator_errors.get(kind, 0) + int(n)
        for c in part["crash_examples"]:
            if len(self.examples) < self.max_examples:
                self.examples.append(Crash(**c))


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise InputTimeout("input still running when the alarm rang")


@contextmanager
def guarded(extra_mb: int | None = 768) -> Iterator[None]:
    """The process-wide part of the guard: SIGALRM raises :class:`InputTimeout`, and (unless
    ``extra_mb`` is None) the address space is capped at its current size plus
    ``extra_mb``, so that a decoder allocating from a peer-given count gets a MemoryError
    (a crash) instead of the machine's memory. Both are restored on exit."""
    timer = signal.getitimer(signal.ITIMER_REAL)  # pytest-timeout's, say: re-armed on exit
    old = signal.signal(signal.SIGALRM, _on_alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if extra_mb is not None:
        with open("/proc/self/statm") as f:
            vsize = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        cap = vsize + (extra_mb << 20)
        if hard == resource.RLIM_INFINITY or cap < hard:
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if timer[0] > 0:
            signal.setitimer(signal.ITIMER_REAL, *timer)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
