"""What a migration's first pass will put on the wire, estimated before it starts.

The forecast (:mod:`xmig.convergence.forecast`) needs the bytes the one-time copy moves, not
the bytes the guest holds: memory's first pass skips zero pages and compresses the rest
(:class:`~xmig.memory.codec.PageEncoder`), and the disk's bulk copy skips holes and all-zero
blocks (:func:`~xmig.storage.bulk.data_runs`). Both are estimated from a seeded sample of
the guest's own data, read once (a few MiB whatever the guest's size), with the same code
the migration uses. A sample is an estimate: ``bench/outrun.py`` reports forecast vs actual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from xmig.memory.codec import PageEncoder
from xmig.memory.guest import PAGE_SIZE, SourceMemory
from xmig.storage.bulk import data_runs

#: pages per sampled run: neighbouring pages, as the first pass sends them, compress together
RUN_PAGES = 16
#: disk bytes per sampled read
DISK_SAMPLE = 64 << 10


class DataExtents(Protocol):
    """A disk image that can say where its data is (:class:`~xmig.storage.raw.RawFileBackend`)."""

    @property
    def size(self) -> int: ...

    def pread(self, offset: int, length: int) -> bytes: ...

    def data_extent(self, offset: int) -> tuple[int, int] | None: ...


@dataclass(frozen=True)
class FirstPass:
    """The one-time copy's size, raw and as estimated on the wire."""

    ram_bytes: int
    memory_wire_ratio: float  #: wire bytes ÷ RAM bytes for memory's first pass
    written_wire_ratio: float  #: wire bytes ÷ raw bytes of the pages that are not zero
    disk_allocated_bytes: int  #: the image's data extents (holes are never read)
    disk_wire_bytes: int  #: of those, the bytes in blocks that are not all zero

    @property
    def wire_bytes(self) -> int:
        return round(self.ram_bytes * self.memory_wire_ratio) + self.disk_wire_bytes


def memory_wire_ratio(memory: SourceMemory, *, sample_pages: int = 2048, seed: int = 0,
                      ) -> tuple[float, float]:
    """Wire bytes ÷ raw bytes of memory's first pass, and of its pages that are not zero
    (what the guest dirties), from ``sample_pages`` pages read in seeded runs of
    :data:`RUN_PAGES` and encoded by a fresh encoder (zero pages cost no wire bytes; the
    rest are compressed as the first pass compresses them)."""
    n = memory.page_count
    if n == 0:
        return 1.0, 1.0
    runs = max(1, min(sample_pages, n) // RUN_PAGES)
    rng = np.random.default_rng(seed)
    starts = rng.choice(max(1, n // RUN_PAGES), size=min(runs, max(1, n // RUN_PAGES)),
                        replace=False) * RUN_PAGES
    idx = np.unique((starts[:, None] + np.arange(RUN_PAGES)[None, :]).ravel())
    idx = idx[idx < n]
    encoder = PageEncoder(n)
    encoder.encode(idx, bytes(memory.read_pages(idx)))
    st = encoder.stats
    written = (st.pages - st.zero_pages) * PAGE_SIZE
    return st.wire_ratio, (st.wire_bytes / written if written else 1.0)


def disk_wire_bytes(disk: DataExtents, *, samples: int = 256, seed: int = 0,
                    ) -> tuple[int, int]:
    """``(allocated, estimated wire)`` bytes of a disk's bulk copy: the data extents
    (SEEK_DATA), times the share of :data:`DISK_SAMPLE`-byte reads at seeded offsets within
    them whose blocks are not all zero."""
    extents: list[tuple[int, int]] = []
    offset = 0
    while (ext := disk.data_extent(offset)) is not None:
        extents.append(ext)
        offset = ext[1]
    allocated = sum(b - a for a, b in extents)
    if allocated == 0:
        return 0, 0
    rng = np.random.default_rng(seed)
    ends = np.cumsum([b - a for a, b in extents])
    read = sent = 0
    for pos in sorted(rng.integers(0, allocated, size=samples).tolist()):
        i = int(np.searchsorted(ends, pos, side="right"))
        a, b = extents[i]
        at = a + pos - (int(ends[i - 1]) if i else 0)
        at -= at % DISK_SAMPLE
        data = disk.pread(max(at, a), min(DISK_SAMPLE, b - max(at, a)))
        read += len(data)
        sent += sum(len(v) for _, v in data_runs(data, max(at, a)))
    return allocated, round(allocated * sent / read) if read else allocated


def first_pass(memory: SourceMemory, disk: DataExtents | None, *, seed: int = 0) -> FirstPass:
    """The one-time copy of ``memory`` and ``disk``, estimated from seeded samples."""
    ratio, written = memory_wire_ratio(memory, seed=seed)
    allocated, wire = disk_wire_bytes(disk, seed=seed) if disk is not None else (0, 0)
    return FirstPass(memory.page_count * PAGE_SIZE, ratio, written, allocated, wire)
