"""Test helpers: a numpy-backed guest memory with a dirty log, and a seeded writer.

:class:`ArrayMemory` is both a :class:`~xmig.memory.guest.SourceMemory` and a
:class:`~xmig.memory.guest.DestinationMemory`, so the engine can be run without a real
guest. :class:`Writer` dirties it like a vCPU would — a step at a time (``step(n)``,
deterministic for a seed) or from a thread at a rate it scales by the throttle — and obeys
the dirty-log rule: a page is marked dirty *after* it is written.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import xxhash

from xmig.memory.guest import PAGE_SIZE, PageIndices

MAX_THROTTLE = 0.99


@functools.lru_cache(maxsize=1)
def text_corpus(limit: int = 8 << 20) -> npt.NDArray[np.uint8]:
    """Real text and code: the Python standard library's sources (sorted, so the same on
    every run of one Python build), ``limit`` bytes at most."""
    root = Path(functools.__file__).parent
    parts, size = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        parts.append(data)
        size += len(data)
        if size >= limit:
            break
    blob = b"".join(parts)[:limit]
    if len(blob) < 4 * PAGE_SIZE:  # a stripped install: fall back to generated words
        rng = np.random.default_rng(0)
        words = [b"def", b"return", b"self", b"import", b"the", b"page", b"  ", b"\n"]
        blob = b" ".join(words[k] for k in rng.integers(len(words), size=limit // 4))
    return np.frombuffer(blob, np.uint8)


def text_pages(rng: np.random.Generator, n: int) -> npt.NDArray[np.uint8]:
    """``n`` pages of text cut at random offsets of :func:`text_corpus`."""
    corpus = text_corpus()
    out = np.empty((n, PAGE_SIZE), np.uint8)
    offsets = rng.integers(0, len(corpus) - PAGE_SIZE, size=n)
    for k, off in enumerate(offsets.tolist()):
        out[k] = corpus[off:off + PAGE_SIZE]
    return out


def pattern_pages(kinds: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    """Pages from a small set of 8 repeated patterns (0xff fill, a counter, …)."""
    base = np.empty((8, PAGE_SIZE), np.uint8)
    ramp = np.arange(PAGE_SIZE, dtype=np.uint32)
    for k in range(8):
        base[k] = ((ramp * (k + 1) + 0x11 * k) & 0xFF).astype(np.uint8)
    base[0] = 0xFF
    return base[kinds % 8]


@dataclass(frozen=True)
class ContentMix:
    """Fractions of page kinds (normalised): the mix of the reference guest."""

    zero: float = 0.30
    text: float = 0.35
    random: float = 0.20
    pattern: float = 0.10  #: repeated pages (identical across the guest)
    sparse: float = 0.05  #: mostly zero with a few words set (page tables, bitmaps)

    def probabilities(self) -> npt.NDArray[np.float64]:
        p = np.array([self.zero, self.text, self.random, self.pattern, self.sparse])
        out: npt.NDArray[np.float64] = p / p.sum()
        return out


def make_pages(rng: np.random.Generator, n: int, mix: ContentMix) -> npt.NDArray[np.uint8]:
    """``n`` pages drawn from ``mix``."""
    kinds = rng.choice(5, size=n, p=mix.probabilities())
    out = np.zeros((n, PAGE_SIZE), np.uint8)
    for kind in range(1, 5):
        at = np.flatnonzero(kinds == kind)
        if not len(at):
            continue
        if kind == 1:
            out[at] = text_pages(rng, len(at))
        elif kind == 2:
            out[at] = np.frombuffer(rng.bytes(len(at) * PAGE_SIZE), np.uint8).reshape(
                -1, PAGE_SIZE)
        elif kind == 3:
            out[at] = pattern_pages(rng.integers(0, 8, size=len(at)))
        else:
            words = out[at].view(np.uint64)
            cols = rng.integers(0, PAGE_SIZE // 8, size=(len(at), 8))
            words[np.arange(len(at))[:, None], cols] = rng.integers(
                1, 1 << 63, size=cols.shape, dtype=np.int64).astype(np.uint64)
            out[at] = words.view(np.uint8)
    return out


class ArrayMemory:
    """Guest RAM in a numpy array, with a dirty bitmap and a dirty-rate meter.

    As a source it starts with every page dirty (the first fetch returns them all); as a
    destination it starts zero-filled. ``guest_write`` is the guest's write (then mark);
    ``write_pages``/``zero_pages`` are the migrator's (no mark).
    """

    def __init__(self, page_count: int, *, clock: Callable[[], float] = time.monotonic,
                 rate_window: float = 0.5) -> None:
        self.pages = np.zeros((page_count, PAGE_SIZE), np.uint8)
        self._dirty = np.ones(page_count, bool)
        self._lock = threading.Lock()
        self._clock = clock
        self._window = rate_window
        self._marks: deque[tuple[float, int]] = deque()
        self.throttle = 0.0
        self.throttle_log: list[float] = []

    # -- SourceMemory -----------------------------------------------------------------

    @property
    def page_count(self) -> int:
        return len(self.pages)

    def fetch_and_clear_dirty(self) -> PageIndices:
        with self._lock:
            idx = np.flatnonzero(self._dirty).astype(np.int64)
            self._dirty[idx] = False
        return idx

    def mark_all_dirty(self) -> None:
        with self._lock:
            self._dirty[:] = True

    def read_pages(self, indices: PageIndices) -> memoryview:
        return self.pages[np.asarray(indices, np.int64)].reshape(-1).data

    def dirty_rate(self) -> float:
        now = self._clock()
        with self._lock:
            while self._marks and self._marks[0][0] < now - self._window:
                self._marks.popleft()
            marked = sum(n for _, n in self._marks)
        return marked * PAGE_SIZE / self._window

    def set_throttle(self, fraction: float) -> None:
        self.throttle = min(max(fraction, 0.0), MAX_THROTTLE)
        self.throttle_log.append(self.throttle)

    # -- DestinationMemory ------------------------------------------------------------

    def write_pages(self, indices: PageIndices, data: memoryview | bytes) -> None:
        idx = np.asarray(indices, np.int64)
        self.pages[idx] = np.frombuffer(data, np.uint8).reshape(len(idx), PAGE_SIZE)

    def zero_pages(self, indices: PageIndices) -> None:
        self.pages[np.asarray(indices, np.int64)] = 0

    # -- the guest's side -------------------------------------------------------------

    def guest_write(self, indices: PageIndices, data: npt.NDArray[np.uint8]) -> None:
        """Write whole pages, then mark them dirty (the dirty-log rule)."""
        idx = np.asarray(indices, np.int64)
        self.pages[idx] = data.reshape(len(idx), PAGE_SIZE)
        self.mark_dirty(idx)

    def mark_dirty(self, indices: PageIndices) -> None:
        with self._lock:
            fresh = int(np.count_nonzero(~self._dirty[indices]))
            self._dirty[indices] = True
            if fresh:
                self._marks.append((self._clock(), fresh))

    def clear_dirty(self) -> None:
        """Forget every mark (a destination built from a copy, for instance)."""
        with self._lock:
            self._dirty[:] = False

    def fill(self, seed: int, mix: ContentMix | None = None, *, chunk: int = 8192) -> None:
        """Fill with ``mix`` (default :class:`ContentMix`), deterministically for ``seed``."""
        rng = np.random.default_rng(seed)
        for start in range(0, self.page_count, chunk):
            n = min(chunk, self.page_count - start)
            self.pages[start:start + n] = make_pages(rng, n, mix or ContentMix())

    def digest(self, chunk_pages: int = 4) -> bytes:
        """The memory digest written out plainly, as a check on
        :func:`xmig.memory.engine.memory_digest`: xxh3-128 over the xxh3-64 (little-endian)
        of each ``chunk_pages``-page chunk in order."""
        data = memoryview(self.pages.data).cast("B")
        step = chunk_pages * PAGE_SIZE
        parts = [xxhash.xxh3_64_intdigest(data[o:o + step]).to_bytes(8, "little")
                 for o in range(0, len(data), step)]
        return xxhash.xxh3_128_digest(b"".join(parts))


@dataclass(frozen=True)
class Workload:
    """What :class:`Writer` does: ``rate`` bytes/s of page writes (at throttle 0) over the
    first ``hot_pages`` pages (all when None); a write edits a few words of a page
    (``edit``), or rewrites it with text, random bytes, zeros or a repeated pattern."""

    rate: float = 20e6
    hot_pages: int | None = None
    edit: float = 0.6
    text: float = 0.15
    random: float = 0.1
    zero: float = 0.1
    pattern: float = 0.05


class Writer:
    """A seeded vCPU that dirties an :class:`ArrayMemory`."""

    def __init__(self, memory: ArrayMemory, workload: Workload, seed: int = 0,
                 tick: float = 0.005) -> None:
        self.memory = memory
        self.workload = workload
        self.rng = np.random.default_rng(seed)
        self.tick = tick
        self.writes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._credit = 0.0

    def step(self, n: int) -> PageIndices:
        """Write ``n`` pages now; return their indices."""
        w, rng, mem = self.workload, self.rng, self.memory
        span = min(w.hot_pages or mem.page_count, mem.page_count)
        idx = np.unique(rng.integers(0, span, size=n)).astype(np.int64)
        p = np.array([w.edit, w.text, w.random, w.zero, w.pattern])
        kinds = rng.choice(5, size=len(idx), p=p / p.sum())
        rows = mem.pages[idx]
        edit = np.flatnonzero(kinds == 0)
        if len(edit):
            words = rows[edit].view(np.uint64)
            cols = rng.integers(0, PAGE_SIZE // 8, size=(len(edit), 4))
            words[np.arange(len(edit))[:, None], cols] = rng.integers(
                0, 1 << 63, size=cols.shape, dtype=np.int64).astype(np.uint64)
            rows[edit] = words.view(np.uint8)
        for kind in range(1, 5):
            at = np.flatnonzero(kinds == kind)
            if len(at):
                rows[at] = self._content(kind, len(at))
        mem.guest_write(idx, rows)
        self.writes += len(idx)
        return idx

    def _content(self, kind: int, k: int) -> npt.NDArray[np.uint8]:
        rng = self.rng
        if kind == 1:
            return text_pages(rng, k)
        if kind == 2:
            return np.frombuffer(rng.bytes(k * PAGE_SIZE), np.uint8).reshape(k, PAGE_SIZE)
        if kind == 3:
            return np.zeros((k, PAGE_SIZE), np.uint8)
        return pattern_pages(rng.integers(0, 8, size=k))

    # -- threaded mode ----------------------------------------------------------------

    def start(self) -> Writer:
        """Write from a thread at ``rate × (1 − throttle)`` until :meth:`stop`."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="xmig-test-writer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop writing (the guest's pause): when this returns, no write is in progress."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            self._credit += (now - last) * self.workload.rate * (1 - self.memory.throttle)
            last = now
            n = int(self._credit // PAGE_SIZE)
            if n:
                self._credit -= n * PAGE_SIZE
                self.step(n)
            self._stop.wait(self.tick)

    def __enter__(self) -> Writer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
