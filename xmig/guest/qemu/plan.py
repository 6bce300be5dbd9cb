"""A QEMU guest's rates for a forecast (``xmig migrate --qemu-qmp SOCKET --plan``).

- Memory dirtied: the pages of the guest's shared RAM file whose contents changed over the
  measurement window (a seeded sample of at most :data:`SAMPLE_PAGES` pages, digested at
  both ends). QEMU's ``calc-dirty-rate`` samples 512 pages per GiB: a 128 MiB guest
  writing 4 MB/s into 16 MiB read 0 in a second.
- Disk written: ``query-blockstats``'s ``wr_bytes`` of the migrated drive, before and after.
- The first pass: QEMU's stream sends a zero page as a flag and any other page whole (xmig
  tunnels it uncompressed), so memory's first pass costs the share of pages that are not
  zero, read from a seeded sample of the guest's shared RAM file (xmig's RAM check reads the
  same file). The mirror copies the image's data extents (holes are not read).

Reads only: nothing in the guest or its QEMU changes.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from xmig.convergence.forecast import GuestRates
from xmig.convergence.sample import disk_wire_bytes
from xmig.guest.qemu.machine import QemuGuest
from xmig.memory.guest import PAGE_SIZE
from xmig.storage.raw import RawFileBackend

SAMPLE_PAGES = 32768
#: what QEMU's stream spends on a page besides its bytes (its header and address)
PAGE_OVERHEAD = 9
ZERO_PAGE = bytes(PAGE_SIZE)


async def qemu_guest_rates(guest: QemuGuest, *, seconds: float, seed: int = 0) -> GuestRates:
    """The rates of the QEMU guest ``guest`` over ``seconds``, and its first pass's wire
    size."""
    ram = guest.config.ram_mb << 20
    pages = RamSample(guest.mem_path, ram, seed=seed)
    first = digests(await asyncio.to_thread(pages.read))
    written, t0 = await _written(guest), time.monotonic()
    await asyncio.sleep(seconds)  # the measurement window
    disk_write = max(0.0, (await _written(guest) - written) / (time.monotonic() - t0))
    now = await asyncio.to_thread(pages.read)
    dirty = pages.scale(int(np.count_nonzero(first != digests(now)))) / (time.monotonic() - t0)
    nonzero = pages.scale(sum(1 for page in now if page != ZERO_PAGE)) / ram * PAGE_SIZE
    allocated = 0
    if guest.config.disk is not None:
        allocated = await asyncio.to_thread(_allocated, guest.config.disk)
    return GuestRates(ram_bytes=ram, disk_bytes=allocated, dirty_Bps=dirty * PAGE_SIZE,
                      disk_write_Bps=disk_write,
                      wire_ratio=1.0 + PAGE_OVERHEAD / PAGE_SIZE,
                      first_pass_ratio=nonzero * (1.0 + PAGE_OVERHEAD / PAGE_SIZE)
                      + (1 - nonzero) * PAGE_OVERHEAD / PAGE_SIZE)


class RamSample:
    """A seeded sample of the pages of a guest's RAM file, read with ``pread``."""

    def __init__(self, path: Path, size: int, *, pages: int = SAMPLE_PAGES, seed: int = 0,
                 ) -> None:
        self.path, self.count = path, size // PAGE_SIZE
        rng = np.random.default_rng(seed)
        self.picked = np.sort(rng.choice(self.count, size=min(pages, self.count),
                                         replace=False)) if self.count else np.zeros(0, int)

    def scale(self, hits: int) -> float:
        """Pages of the whole RAM, from ``hits`` among the sampled ones."""
        return hits * self.count / len(self.picked) if len(self.picked) else 0.0

    def read(self) -> list[bytes]:
        """The sampled pages as they are now."""
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return [os.pread(fd, PAGE_SIZE, p * PAGE_SIZE) for p in self.picked.tolist()]
        finally:
            os.close(fd)


def digests(pages: list[bytes]) -> npt.NDArray[np.uint64]:
    return np.array([xxhash.xxh3_64_intdigest(page) for page in pages], np.uint64)


def _allocated(disk: Path) -> int:
    with RawFileBackend(disk, readonly=True) as image:
        return disk_wire_bytes(image, samples=0)[0]


async def _written(guest: QemuGuest) -> int:
    stats: Any = await guest.execute("query-blockstats")
    for dev in stats:
        if dev.get("device") == guest.disk_device or dev.get("node-name") == guest.disk_device:
            return int(dev["stats"]["wr_bytes"])
    return sum(int(dev["stats"]["wr_bytes"]) for dev in stats)
