"""The guest's three shared files, and the host's view of them.

- ``<name>.ram``: guest RAM, ``page_count × PAGE_SIZE`` bytes.
- ``<name>.dirty``: the dirty log, one byte per page (1 = written since the last fetch).
- ``<name>.ctl``: the control block, one page: 64 int64 then 64 float64 slots (indices below).
  The host writes only :data:`F_THROTTLE`; the guest writes the rest inside a seqlock
  (:data:`I_SEQ` odd while it updates), so a host snapshot is never torn.

No pickling and no syscalls on the hot path: both sides use numpy views of the same mmaps.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import xxhash

from xmig.errors import GuestNotFound, GuestStateError
from xmig.memory.guest import PAGE_SIZE, PageIndices

CONTROL_BYTES = 4096
CONTROL_MAGIC = 0x584D49475349_4D31  # "XMIGSIM1"
CONTROL_VERSION = 1
MAX_THROTTLE = 0.99

# int64 slots
I_MAGIC = 0
I_VERSION = 1
I_SEQ = 2
I_STATE = 3
I_PID = 4
I_PROGRESS = 5
I_PAGE_WRITES = 6
I_DIRTY_MARKS = 7
"""Pages whose dirty byte went from 0 to 1: growth of the set the migrator must send."""
I_DISK_WRITES = 8
I_DISK_WRITE_BYTES = 9
I_DISK_READS = 10
I_UDP_REQUESTS = 11
I_TABLE_ENTRIES = 12
I_UDP_PORT = 13
I_SLOTS = 64

# float64 slots
F_THROTTLE = 0
F_STARTED_MONO = 1
F_LAST_PROGRESS_MONO = 2
F_LAST_PROGRESS_WALL = 3
F_PAUSED_AT_MONO = 4
F_PAUSED_AT_WALL = 5
F_RESUMED_AT_MONO = 6
F_RESUMED_AT_WALL = 7
F_FIRST_PROGRESS_AFTER_RESUME_MONO = 8
F_PROGRESS_RATE = 9
F_WRITE_RATE = 10
F_DIRTY_RATE = 11
F_BUSY_S = 12
F_STALLED_S = 13
F_APPLIED_THROTTLE = 14
F_SLOTS = 64

# guest states (I_STATE)
STATE_STARTING = 0
STATE_RUNNING = 1
STATE_PAUSED = 2
STATE_INCOMING = 3
"""Paused, waiting for its device state (a destination guest)."""
STATE_EXITED = 4
STATE_FAILED = 5
STATE_NAMES = {
    STATE_STARTING: "starting",
    STATE_RUNNING: "running",
    STATE_PAUSED: "paused",
    STATE_INCOMING: "incoming",
    STATE_EXITED: "exited",
    STATE_FAILED: "failed",
}


@dataclass(frozen=True)
class SharedPaths:
    """Where one guest's shared files live."""

    ram: Path
    dirty: Path
    control: Path

    @classmethod
    def for_guest(cls, shm_dir: Path, name: str) -> SharedPaths:
        return cls(shm_dir / f"{name}.ram", shm_dir / f"{name}.dirty", shm_dir / f"{name}.ctl")

    def to_json(self) -> dict[str, str]:
        return {"ram": str(self.ram), "dirty": str(self.dirty), "control": str(self.control)}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> SharedPaths:
        return cls(Path(data["ram"]), Path(data["dirty"]), Path(data["control"]))


def create_file(path: Path, size: int, *, exclusive: bool = True) -> None:
    """Create a sparse file of ``size`` bytes (all zeros)."""
    flags = os.O_RDWR | os.O_CREAT | (os.O_EXCL if exclusive else 0)
    fd = os.open(path, flags, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def map_file(path: Path, size: int | None = None) -> mmap.mmap:
    """Map ``path`` shared, read-write. ``size`` given: the file must have exactly that size."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError as err:
        raise GuestNotFound(f"guest file {path} does not exist") from err
    try:
        actual = os.fstat(fd).st_size
        if size is not None and actual != size:
            raise GuestStateError(f"guest file {path} has {actual} bytes, expected {size}")
        return mmap.mmap(fd, actual, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def unmap(mm: mmap.mmap) -> None:
    """Close ``mm`` unless views still export it (then the GC unmaps it later). Views must
    hold the export: ``np.frombuffer``, ``memoryview``; ``np.ndarray(buffer=mm)`` does not."""
    with contextlib.suppress(BufferError):
        mm.close()


def remove_files(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class ControlBlock:
    """Typed views of the control page: ``ints`` (int64) and ``floats`` (float64)."""

    def __init__(self, mm: mmap.mmap) -> None:
        self._mm = mm
        # frombuffer, not ndarray(buffer=): its views hold the mapping's export, so a close
        # while one is in use fails (and the GC unmaps later) instead of leaving it dangling
        self.ints: npt.NDArray[np.int64] = np.frombuffer(mm, np.int64, I_SLOTS, 0)
        self.floats: npt.NDArray[np.float64] = np.frombuffer(
            mm, np.float64, F_SLOTS, I_SLOTS * 8)

    def init(self, pid: int) -> None:
        """Fresh block (guest side)."""
        self.ints[:] = 0
        self.floats[:] = 0.0
        self.ints[I_MAGIC] = CONTROL_MAGIC
        self.ints[I_VERSION] = CONTROL_VERSION
        self.ints[I_PID] = pid

    def check(self, path: Path) -> None:
        if int(self.ints[I_MAGIC]) != CONTROL_MAGIC or int(self.ints[I_VERSION]) != CONTROL_VERSION:
            raise GuestNotFound(f"{path} is not a reference guest's control block")

    def begin(self) -> None:
        """Guest: open an update (readers retry until :meth:`end`)."""
        self.ints[I_SEQ] += 1

    def end(self) -> None:
        self.ints[I_SEQ] += 1

    def snapshot(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """Host: a consistent copy of both arrays."""
        for _ in range(10_000):
            before = int(self.ints[I_SEQ])
            if before & 1:
                continue
            ints, floats = self.ints.copy(), self.floats.copy()
            if int(self.ints[I_SEQ]) == before:
                return ints, floats
        return self.ints.copy(), self.floats.copy()  # a guest stuck mid-update: best effort

    def close(self) -> None:
        del self.ints, self.floats
        unmap(self._mm)


class SimMemory:
    """The host's view of a reference guest's RAM and dirty log: implements both
    :class:`~xmig.memory.guest.SourceMemory` and :class:`~xmig.memory.guest.DestinationMemory`.

    Usable from any process that can open the shared files (:meth:`open`).
    """

    def __init__(self, paths: SharedPaths, page_count: int) -> None:
        self.paths = paths
        self._page_count = page_count
        self._ram_mm = map_file(paths.ram, page_count * PAGE_SIZE)
        self._dirty_mm = map_file(paths.dirty, page_count)
        self._control = ControlBlock(map_file(paths.control, CONTROL_BYTES))
        self._control.check(paths.control)
        # views that hold the mappings' exports (np.ndarray(buffer=) does not: a close()
        # racing a reader thread unmapped the RAM under it, a segfault in CI)
        self._ram: npt.NDArray[np.uint8] = np.frombuffer(
            self._ram_mm, np.uint8, page_count * PAGE_SIZE).reshape(page_count, PAGE_SIZE)
        self._dirty: npt.NDArray[np.uint8] = np.frombuffer(self._dirty_mm, np.uint8,
                                                           page_count)

    @classmethod
    def open(cls, paths: SharedPaths) -> SimMemory:
        """Attach to a guest's shared files (page count from the RAM file's size)."""
        try:
            size = paths.ram.stat().st_size
        except FileNotFoundError as err:
            raise GuestNotFound(f"guest RAM file {paths.ram} does not exist") from err
        return cls(paths, size // PAGE_SIZE)

    @property
    def page_count(self) -> int:
        """Pages of guest RAM."""
        return self._page_count

    @property
    def control(self) -> ControlBlock:
        return self._control

    def fetch_and_clear_dirty(self) -> PageIndices:
        """Indices of the pages marked dirty, each mark cleared before this returns.

        The guest marks a page *after* writing it and this clears a mark *before* the caller
        reads the page: a write racing with this call is in the copy the caller reads next,
        or in the next call's answer. (x86 keeps stores in order; the clear and the later read
        are separated by far more than the store buffer's drain time.)
        """
        indices = np.flatnonzero(self._dirty.copy())  # numpy's scan needs a still array
        self._dirty[indices] = 0
        return indices.astype(np.int64, copy=False)

    def mark_all_dirty(self) -> None:
        """Every page dirty again (a new migration sends them all)."""
        self._dirty[:] = 1

    def read_pages(self, indices: PageIndices) -> memoryview:
        """Copies of the pages at ``indices``, concatenated."""
        return self._ram[np.asarray(indices, dtype=np.int64)].reshape(-1).data

    def write_pages(self, indices: PageIndices, data: memoryview | bytes) -> None:
        """Store ``data`` at ``indices`` (no dirty marks: used on paused destinations)."""
        idx = np.asarray(indices, dtype=np.int64)
        pages = np.frombuffer(data, dtype=np.uint8)
        if pages.size != idx.size * PAGE_SIZE:
            raise ValueError(f"{pages.size} bytes for {idx.size} pages")
        self._ram[idx] = pages.reshape(idx.size, PAGE_SIZE)

    def zero_pages(self, indices: PageIndices) -> None:
        self._ram[np.asarray(indices, dtype=np.int64)] = 0

    def dirty_rate(self) -> float:
        """Distinct pages × PAGE_SIZE written per second over the guest's last 0.5 s window."""
        return float(self._control.floats[F_DIRTY_RATE])

    def write_rate(self) -> float:
        """Page-write bytes per second over the guest's last window (repeats included)."""
        return float(self._control.floats[F_WRITE_RATE])

    def set_throttle(self, fraction: float) -> None:
        """Stall the vCPU ``fraction`` of each 10 ms slice (clamped to [0, 0.99])."""
        if math.isnan(fraction):
            raise ValueError("throttle fraction is NaN")
        self._control.floats[F_THROTTLE] = min(max(fraction, 0.0), MAX_THROTTLE)

    @property
    def throttle(self) -> float:
        return float(self._control.floats[F_THROTTLE])

    def digest(self) -> str:
        """xxh3-128 of the whole RAM, hex."""
        return ram_digest(self._ram_mm)

    def close(self) -> None:
        del self._ram, self._dirty
        unmap(self._ram_mm)
        unmap(self._dirty_mm)
        self._control.close()


def ram_digest(buffer: mmap.mmap | memoryview | bytes) -> str:
    """The digest :meth:`SimMemory.digest` and device-state checks use."""
    return xxhash.xxh3_128(buffer).hexdigest()
