"""Bulk copy planning: which part of the source disk to read next, and what of it to send.
Sans-IO.

The copier walks the disk once, in order. At each step the caller tells the planner where
the next data extent starts (``SEEK_DATA``/``SEEK_HOLE`` from :meth:`RawFileBackend.data_extent`,
asked at the cursor *at that step*, so a write into a hole ahead of the cursor is never
missed); the planner claims ``[cursor, end)`` -- holes before the extent included, at most
``chunk`` bytes of data -- and the caller moves the mirror's cursor to ``end`` *before*
reading ``[read_start, end)``. :func:`data_runs` then drops zero blocks (numpy) so only
non-zero runs travel; the receiver knows the rest of a claimed range is zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Data = bytes | bytearray | memoryview
CHUNK = 1 << 20  #: data read (and sent) per step at most
BLOCK = 4096  #: zero-detection granularity


@dataclass(frozen=True)
class Claim:
    """One step: ``[start, end)`` is claimed; ``[read_start, end)`` must be read."""

    start: int
    read_start: int
    end: int

    @property
    def read_length(self) -> int:
        return self.end - self.read_start


@dataclass
class BulkStats:
    claimed_bytes: int = 0  #: bytes the cursor passed
    read_bytes: int = 0
    data_bytes: int = 0  #: non-zero bytes sent
    hole_bytes: int = 0  #: skipped as holes (never read)
    zero_bytes: int = 0  #: read, found zero, not sent
    steps: int = 0


class BulkPlanner:
    """The cursor over a disk of ``size`` bytes and the statistics of the copy."""

    def __init__(self, size: int, *, chunk: int = CHUNK, block: int = BLOCK) -> None:
        if chunk <= 0 or block <= 0 or chunk % block:
            raise ValueError("chunk must be a positive multiple of block")
        self.size = size
        self.chunk = chunk
        self.block = block
        self.cursor = 0
        self.stats = BulkStats()

    @property
    def done(self) -> bool:
        return self.cursor >= self.size

    def claim(self, extent: tuple[int, int] | None) -> Claim:
        """The next step, given the first data extent at or after the cursor (``None``: only
        holes remain). Ends of data are aligned to ``chunk`` so steps stay aligned."""
        if self.done:
            raise ValueError("the bulk copy is complete")
        start = self.cursor
        if extent is None:
            end = read_start = self.size
        else:
            read_start = max(extent[0], start)
            if read_start >= self.size:
                end = read_start = self.size
            else:
                limit = (read_start // self.chunk + 1) * self.chunk
                end = min(extent[1], limit, self.size)
                if end <= read_start:
                    raise ValueError(f"empty data extent {extent} at cursor {start}")
        self.cursor = end
        st = self.stats
        st.steps += 1
        st.claimed_bytes += end - start
        st.hole_bytes += read_start - start
        st.read_bytes += end - read_start
        return Claim(start, read_start, end)

    def runs(self, claim: Claim, data: Data) -> list[tuple[int, memoryview]]:
        """The non-zero runs of ``data`` (read at ``claim.read_start``), counted."""
        out = data_runs(data, claim.read_start, self.block)
        sent = sum(len(v) for _, v in out)
        self.stats.data_bytes += sent
        self.stats.zero_bytes += len(data) - sent
        return out


def data_runs(data: Data, offset: int, block: int = BLOCK) -> list[tuple[int, memoryview]]:
    """``data`` (at disk ``offset``) without its all-zero ``block``-sized blocks (aligned
    to ``offset``): the remaining runs as ``(disk offset, view)``, merged when adjacent."""
    view = memoryview(data).cast("B")
    n = len(view)
    full = n // block
    nonzero = np.empty(full + (1 if n % block else 0), dtype=bool)
    if full:
        dtype = np.uint64 if block % 8 == 0 else np.uint8
        arr = np.frombuffer(view[: full * block], dtype=dtype)
        nonzero[:full] = arr.reshape(full, -1).any(axis=1)
    if n % block:
        nonzero[full] = bool(np.frombuffer(view[full * block:], dtype=np.uint8).any())
    if nonzero.all():
        return [(offset, view)] if n else []
    edges = np.flatnonzero(np.diff(np.concatenate(([False], nonzero, [False])).astype(np.int8)))
    out = []
    for a, b in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
        lo, hi = a * block, min(b * block, n)
        out.append((offset + lo, view[lo:hi]))
    return out


def is_zero(data: Data) -> bool:
    """Every byte of ``data`` is zero."""
    view = memoryview(data).cast("B")
    if len(view) % 8 == 0:
        return not np.frombuffer(view, dtype=np.uint64).any()
    return not np.frombuffer(view, dtype=np.uint8).any()
