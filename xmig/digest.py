"""Digests of memory and disks, kept current while they change, for verification (I5, I2).

A space (a guest's RAM, a disk image) is cut into fixed-size chunks; each chunk has an
xxh3-64 digest; the space's digest is the xxh3-128 of the chunk digests in order. Both
sides of a migration keep one: a chunk is *marked* stale when something may have changed
it, and :meth:`ChunkDigests.refresh` re-reads and re-hashes only stale chunks. Pre-copy
keeps both sides nearly fresh, so at switchover only the last round's chunks are read again
and verification adds milliseconds to the blackout instead of a pass over every byte.

Soundness: a chunk is marked *after* the change is visible (the dirty log marks a page
after the guest wrote it; the NBD server hands a write to its hook after writing it
locally; the destination marks after applying), and :meth:`refresh` clears a chunk's mark
*before* reading it. A change racing a refresh therefore leaves the chunk marked again,
and the final refresh, with the guest paused and every change marked, reads it anew.

The caller passes the function that reads bytes; no clock, no asyncio. Refreshes belong
on :func:`worker`, one thread at a lowered priority, so keeping digests current takes CPU
the guest and the data path leave over (on a 2-core host at full speed it cost the
reference guest's workload a third of its progress) instead of competing with them.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt
import xxhash

Read = Callable[[int, int], bytes | bytearray | memoryview]  #: (offset, length) -> bytes

#: the digest worker's nice value (Linux: per thread); 10 weighs ~1/10 of a normal thread
WORKER_NICE = 10

#: chunks read at once by :meth:`ChunkDigests.refresh` (one read per run of stale chunks)
RUN_CHUNKS = 256


class ChunkDigests:
    """Chunk digests of a space of ``size`` bytes. ``known_zero``: the space holds only
    zeros now (a fresh sparse image), so nothing needs reading."""

    def __init__(self, size: int, chunk: int, *, known_zero: bool = False) -> None:
        if size < 0 or chunk <= 0:
            raise ValueError("size must be ≥ 0 and chunk > 0")
        self.size = size
        self.chunk = chunk
        n = -(-size // chunk)
        self.digests: npt.NDArray[np.uint64] = np.zeros(n, np.uint64)
        self.stale: npt.NDArray[np.bool_] = np.ones(n, np.bool_)
        self.bytes_read = 0  #: bytes re-read and hashed so far (cost accounting)
        if known_zero and n:
            self.digests[:] = xxhash.xxh3_64_intdigest(bytes(chunk))
            tail = size - (n - 1) * chunk
            self.digests[-1] = xxhash.xxh3_64_intdigest(bytes(tail))
            self.stale[:] = False

    def zero_outside(self, extents: list[tuple[int, int]]) -> None:
        """Only ``extents`` (start, end) may hold data; everything else reads as zeros (a
        sparse image's holes): those chunks get the zero digest without being read."""
        chunk, n = self.chunk, len(self.digests)
        data = np.zeros(n, np.bool_)
        for start, end in extents:
            if end > start:
                data[start // chunk:-(-end // chunk)] = True
        zero = xxhash.xxh3_64_intdigest(bytes(chunk))
        self.digests[~data] = zero
        if n and not data[-1]:
            self.digests[-1] = xxhash.xxh3_64_intdigest(bytes(self.size - (n - 1) * chunk))
        self.stale[:] = data

    def mark(self, start: int, end: int) -> None:
        """Bytes ``start``–``end`` may have changed."""
        if end > start:
            self.stale[start // self.chunk:-(-end // self.chunk)] = True

    def mark_chunks(self, chunks: npt.NDArray[np.int64]) -> None:
        """These chunk numbers may have changed."""
        self.stale[chunks] = True

    @property
    def stale_count(self) -> int:
        return int(np.count_nonzero(self.stale))

    def refresh(self, read: Read, *, limit: int | None = None) -> int:
        """Re-hash stale chunks (at most ``limit`` of them, if given); return how many.
        Blocking: run it in a worker thread for large spaces."""
        idx = np.flatnonzero(self.stale)
        if limit is not None:
            idx = idx[:limit]
        if not len(idx):
            return 0
        # runs of consecutive stale chunks, each read at once (at most RUN_CHUNKS long)
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        chunk, size = self.chunk, self.size
        for run in np.split(idx, breaks):
            for k in range(0, len(run), RUN_CHUNKS):
                first, last = int(run[k]), int(run[min(k + RUN_CHUNKS, len(run)) - 1])
                self.stale[first:last + 1] = False  # before reading: see the module doc
                start, end = first * chunk, min((last + 1) * chunk, size)
                view = memoryview(read(start, end - start))
                self.bytes_read += end - start
                for i in range(first, last + 1):
                    off = (i - first) * chunk
                    self.digests[i] = xxhash.xxh3_64_intdigest(view[off:off + chunk])
        return len(idx)

    def digest(self) -> bytes:
        """The space's digest; every chunk must be fresh (call :meth:`refresh` first)."""
        if self.stale.any():
            raise ValueError(f"{self.stale_count} chunks are stale: refresh first")
        return xxhash.xxh3_128_digest(self.digests.astype("<u8").tobytes())

    def full_digest(self, read: Read) -> bytes:
        """Re-read everything and return the digest (for a one-off check)."""
        self.stale[:] = True
        self.refresh(read)
        return self.digest()


def space_digest(size: int, chunk: int, read: Read) -> bytes:
    """The digest of a space read once, as :class:`ChunkDigests` defines it."""
    return ChunkDigests(size, chunk).full_digest(read)


_worker: ThreadPoolExecutor | None = None
_worker_lock = threading.Lock()


def _lower_priority() -> None:
    # the calling thread only, on Linux; not allowed: a normal-priority worker still works
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, WORKER_NICE)


def worker() -> ThreadPoolExecutor:
    """The process's digest thread (one, low priority) for ``loop.run_in_executor``."""
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = ThreadPoolExecutor(1, thread_name_prefix="xmig-digest",
                                         initializer=_lower_priority)
        return _worker
