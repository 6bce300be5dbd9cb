"""The guest's workloads: deterministic page and disk writers, free of any clock.

A workload advances in *chunks*; what a chunk writes depends only on the seed and the chunks
before it (its RNG state and cursors), never on timing, so RAM after ``k`` chunks is the same
whether the guest ran them at full speed, throttled, or across a migration. The vCPU loop
(:mod:`xmig.guest.sim.vcpu`) decides *when* chunks run (rate, throttle, pause).

- ``idle``: writes nothing; progress counts 100 µs ticks of vCPU time.
- ``uniform``: random pages of the data region (all RAM but the table).
- ``hotset``: random pages of a hot set of ``hotset_bytes`` (its place drawn from the seed).
- ``scan``: pages in sequence, wrapping around the data region.
- ``oltp``: transactions; each puts a key (``oltp:<n>``) into the in-RAM table and writes a
  page of its "buffer pool" (the hot set). Disk I/O on its own RNG stream: log appends
  (4–32 KiB, sequential, wrapping in the first eighth of the disk), 4 KiB random block writes
  in the rest, and some random 4 KiB reads. Every acknowledged write goes to the ledger.

Progress unit: a page write (``uniform``, ``hotset``, ``scan``), a transaction (``oltp``), a
tick (``idle``).
"""

from __future__ import annotations

import mmap
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from xmig.guest.sim.blockdev import BlockDevice, QueuedDisk
from xmig.guest.sim.config import SimConfig
from xmig.guest.sim.ledger import WriteLedger
from xmig.guest.sim.table import MAX_VALUE, KvTable, TableFull
from xmig.memory.guest import PAGE_SIZE

CHUNK_PAGES = 32
OLTP_CHUNK_TX = 8
TICK_S = 1e-4
DISK_BLOCK = 4096
OLTP_VALUE_BYTES = 128
assert OLTP_VALUE_BYTES <= MAX_VALUE


class GuestRam:
    """The guest's view of its RAM and dirty log, with the counters the host reads."""

    def __init__(self, ram: mmap.mmap, dirty: npt.NDArray[np.uint8], write_size: int) -> None:
        self.mm = ram
        self.page_count = len(ram) // PAGE_SIZE
        self.pages: npt.NDArray[np.uint8] = np.frombuffer(
            ram, np.uint8, self.page_count * PAGE_SIZE).reshape(self.page_count, PAGE_SIZE)
        self.blocks = self.pages.reshape(self.page_count, PAGE_SIZE // write_size, write_size)
        self.dirty = dirty
        self._stamps = np.zeros(self.page_count, np.uint8)
        self._epoch = 1
        self.page_writes = 0
        self.dirty_marks = 0
        self.window_distinct = 0

    def write(
        self, idx: npt.NDArray[np.int64], sub: npt.NDArray[np.int64], data: npt.NDArray[np.uint8]
    ) -> None:
        """Write ``data[i]`` into block ``sub[i]`` of page ``idx[i]``, then mark the pages."""
        self.store(idx, sub, data)
        self.mark(idx)

    def store(
        self, idx: npt.NDArray[np.int64], sub: npt.NDArray[np.int64], data: npt.NDArray[np.uint8]
    ) -> None:
        """The write alone, unmarked (:meth:`write` is store, then mark)."""
        self.blocks[idx, sub] = data

    def mark(self, idx: npt.NDArray[np.int64]) -> None:
        """Mark pages dirty. Call only *after* writing them."""
        self.page_writes += idx.size
        pages = np.unique(idx)
        self.dirty_marks += pages.size - int(np.count_nonzero(self.dirty[pages]))
        self.dirty[pages] = 1
        fresh = pages[self._stamps[pages] != self._epoch]
        self.window_distinct += fresh.size
        self._stamps[fresh] = self._epoch

    def mark_page(self, page: int) -> None:
        self.page_writes += 1
        if not self.dirty[page]:
            self.dirty_marks += 1
        self.dirty[page] = 1
        if self._stamps[page] != self._epoch:
            self._stamps[page] = self._epoch
            self.window_distinct += 1

    def next_window(self) -> int:
        """Distinct pages written since the last call; starts a new window."""
        distinct, self.window_distinct = self.window_distinct, 0
        self._epoch += 1
        if self._epoch == 256:
            self._stamps[:] = 0
            self._epoch = 1
        return distinct

    def release(self) -> None:
        del self.pages, self.blocks, self.dirty


@dataclass(frozen=True)
class WorkloadSpec:
    """The parameters of a workload (carried in the device state)."""

    name: str
    rate_Bps: float
    disk_rate_Bps: float
    write_size: int
    data_pages: int
    hot_first_page: int
    hot_pages: int
    oltp_keys: int
    seed: int

    @classmethod
    def from_config(cls, config: SimConfig) -> WorkloadSpec:
        hot_pages = min(config.hotset_bytes // PAGE_SIZE, config.data_pages)
        layout = np.random.Generator(np.random.PCG64(np.random.SeedSequence([config.seed, 0x407])))
        hot_first = int(layout.integers(0, config.data_pages - hot_pages + 1))
        return cls(
            config.workload, config.rate_Bps, config.disk_rate_Bps, config.write_size,
            config.data_pages, hot_first, hot_pages, config.oltp_keys, config.seed,
        )

    @property
    def chunk_units(self) -> int:
        return OLTP_CHUNK_TX if self.name == "oltp" else CHUNK_PAGES

    @property
    def chunk_bytes(self) -> int:
        """Page-write bytes of one chunk (what the rate paces)."""
        pages = 2 * OLTP_CHUNK_TX if self.name == "oltp" else CHUNK_PAGES
        return pages * PAGE_SIZE


class DiskLayout:
    """The oltp disk: log region (first eighth, ≥ 1 MiB) and data region (the rest)."""

    def __init__(self, size: int) -> None:
        size -= size % DISK_BLOCK
        self.log_bytes = min(max(1 << 20, size // 8 // DISK_BLOCK * DISK_BLOCK), size // 2)
        self.data_blocks = (size - self.log_bytes) // DISK_BLOCK


class Workload:
    """One workload's deterministic state and its chunk and disk-op steps."""

    def __init__(
        self,
        spec: WorkloadSpec,
        ram: GuestRam,
        table: KvTable,
        *,
        disk: BlockDevice | None = None,
        ledger: WriteLedger | None = None,
        disk_size: int = 0,
    ) -> None:
        self.spec = spec
        self.ram = ram
        self.table = table
        self.disk = disk
        self.ledger = ledger
        self.layout = DiskLayout(disk_size or disk.size) if disk is not None else None
        seeds = [np.random.SeedSequence([spec.seed, tag]) for tag in (0xA11, 0xD15C)]
        self.rng = np.random.Generator(np.random.PCG64(seeds[0]))
        self.disk_rng = np.random.Generator(np.random.PCG64(seeds[1]))
        self.progress = 0
        self.scan_cursor = 0
        self.log_cursor = 0
        self.disk_seq = 0
        self.disk_writes = 0
        self.disk_write_bytes = 0
        self.disk_reads = 0
        self.table_full = 0
        self._blocks_per_page = PAGE_SIZE // spec.write_size

    @property
    def writes_pages(self) -> bool:
        return self.spec.name != "idle"

    @property
    def writes_disk(self) -> bool:
        return self.spec.name == "oltp" and self.spec.disk_rate_Bps > 0 and self.disk is not None

    def tick(self, ticks: int) -> None:
        """Idle progress."""
        self.progress += ticks

    def run_chunk(self) -> None:
        """One chunk of page writes (and table puts for ``oltp``)."""
        if self.spec.name == "oltp":
            self._oltp_chunk()
            return
        n, rng, spec = CHUNK_PAGES, self.rng, self.spec
        if spec.name == "uniform":
            idx = rng.integers(0, spec.data_pages, n)
        elif spec.name == "hotset":
            idx = spec.hot_first_page + rng.integers(0, spec.hot_pages, n)
        elif spec.name == "scan":
            idx = (self.scan_cursor + np.arange(n, dtype=np.int64)) % spec.data_pages
            self.scan_cursor = int(idx[-1] + 1) % spec.data_pages
        else:
            self.progress += n
            return
        self._write_pages(idx)
        self.progress += n

    def _write_pages(self, idx: npt.NDArray[np.int64]) -> None:
        sub = self.rng.integers(0, self._blocks_per_page, idx.size)
        raw = self.rng.bit_generator.random_raw(idx.size * self.spec.write_size // 8)
        self.ram.write(idx, sub, raw.view(np.uint8).reshape(idx.size, self.spec.write_size))

    def _oltp_chunk(self) -> None:
        n, rng, spec = OLTP_CHUNK_TX, self.rng, self.spec
        keys = rng.integers(0, spec.oltp_keys, n)
        lengths = rng.integers(16, OLTP_VALUE_BYTES + 1, n)
        values = rng.bit_generator.random_raw(n * OLTP_VALUE_BYTES // 8).view(np.uint8)
        for i in range(n):
            at = i * OLTP_VALUE_BYTES
            try:
                self.table.put(b"oltp:%d" % keys[i], values[at : at + lengths[i]].tobytes())
            except TableFull:
                self.table_full += 1
        self._write_pages(spec.hot_first_page + rng.integers(0, spec.hot_pages, n))
        self.progress += n

    def run_units(self, units: int) -> None:
        """Run whole chunks until ``units`` more progress (a multiple of the chunk) is made
        (replays and tests; the vCPU loop paces chunks itself)."""
        target = self.progress + units
        while self.progress < target:
            self.run_chunk()

    @property
    def disk_blocked(self) -> bool:
        """The disk's queue is full: a disk op now would hold the vCPU until a request is
        acknowledged (paced by a migration's mirror), so the loop serves its clients and
        its memory work meanwhile, as a guest's other threads go on while one waits."""
        return isinstance(self.disk, QueuedDisk) and self.disk.full

    def disk_op(self) -> int:
        """One disk operation; returns the bytes written (0 for a read)."""
        assert self.disk is not None and self.layout is not None
        rng, layout = self.disk_rng, self.layout
        kind = int(rng.integers(0, 20))
        queued = self.disk if isinstance(self.disk, QueuedDisk) else None
        if kind >= 18:
            block = int(rng.integers(0, layout.data_blocks))
            if queued is not None:
                queued.submit_read(layout.log_bytes + block * DISK_BLOCK, DISK_BLOCK)
            else:
                self.disk.pread(layout.log_bytes + block * DISK_BLOCK, DISK_BLOCK)
            self.disk_reads += 1
            return 0
        if kind < 9:
            length = DISK_BLOCK * int(rng.integers(1, 9))
            if self.log_cursor + length > layout.log_bytes:
                self.log_cursor = 0
            offset = self.log_cursor
            self.log_cursor += length
        else:
            length = DISK_BLOCK
            offset = layout.log_bytes + DISK_BLOCK * int(rng.integers(0, layout.data_blocks))
        data = rng.bit_generator.random_raw(length // 8).tobytes()
        ledger, seq = self.ledger, self.disk_seq
        if queued is not None:  # the ledger learns of the acknowledgement when it comes
            queued.submit_write(offset, data, None if ledger is None else (
                lambda: ledger.record(seq, offset, data)))
        else:
            self.disk.pwrite(offset, data)  # returned: acknowledged
            if ledger is not None:
                ledger.record(seq, offset, data)
        self.disk_seq += 1
        self.disk_writes += 1
        self.disk_write_bytes += length
        return length

    def state(self) -> dict[str, Any]:
        """Cursors, counters and RNG states: the workload's part of the device state."""
        return {
            "spec": asdict(self.spec),
            "progress": self.progress,
            "scan_cursor": self.scan_cursor,
            "log_cursor": self.log_cursor,
            "disk_seq": self.disk_seq,
            "disk_writes": self.disk_writes,
            "disk_write_bytes": self.disk_write_bytes,
            "disk_reads": self.disk_reads,
            "table_full": self.table_full,
            "rng": self.rng.bit_generator.state,
            "disk_rng": self.disk_rng.bit_generator.state,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state` (the spec must already match)."""
        for name in ("progress", "scan_cursor", "log_cursor", "disk_seq", "disk_writes",
                     "disk_write_bytes", "disk_reads", "table_full"):
            setattr(self, name, int(state[name]))
        self.rng.bit_generator.state = state["rng"]
        self.disk_rng.bit_generator.state = state["disk_rng"]
