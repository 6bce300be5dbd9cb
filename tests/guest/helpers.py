"""Helpers of the reference-guest tests: rate measurement, RAM transfer, offline replay."""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np

from xmig.guest.sim import SimConfig, SimGuest
from xmig.guest.sim.fill import fill_ram
from xmig.guest.sim.shm import ram_digest
from xmig.guest.sim.table import KvTable
from xmig.guest.sim.workloads import GuestRam, Workload, WorkloadSpec
from xmig.memory.guest import PAGE_SIZE


@dataclass(frozen=True)
class Window:
    """Counter deltas over a stretch of guest time (its own progress timestamps)."""

    seconds: float
    progress: int
    page_writes: int
    disk_write_bytes: int

    @property
    def write_Bps(self) -> float:
        return self.page_writes * PAGE_SIZE / self.seconds

    @property
    def progress_rate(self) -> float:
        return self.progress / self.seconds


def measure(guest: SimGuest, seconds: float) -> Window:
    """Deltas over at least ``seconds`` of the guest's time (polls its control block)."""
    before = guest.wait_until(lambda p: p.last_progress_mono > 0, timeout=5)
    after = guest.wait_until(
        lambda p: p.last_progress_mono >= before.last_progress_mono + seconds, timeout=seconds + 10
    )
    return Window(
        after.last_progress_mono - before.last_progress_mono,
        after.counter - before.counter,
        after.page_writes - before.page_writes,
        after.disk_write_bytes - before.disk_write_bytes,
    )


def copy_ram(source: SimGuest, destination: SimGuest, batch: int = 1024) -> None:
    """Every page of a paused source into a destination, through the memory interfaces."""
    for first in range(0, source.memory.page_count, batch):
        idx = np.arange(first, min(first + batch, source.memory.page_count), dtype=np.int64)
        destination.memory.write_pages(idx, source.memory.read_pages(idx))


def migrate(source: SimGuest, destination: SimGuest) -> bytes:
    """Pause ``source``, move RAM and device state, resume ``destination``."""
    source.pause()
    copy_ram(source, destination)
    state = source.device_state()
    destination.load_device_state(state)
    destination.resume()
    return state


def replay(config: SimConfig, units: int) -> tuple[str, Workload]:
    """An uninterrupted in-process run of ``config``'s workload: fresh fill from its seed,
    then ``units`` of progress. Returns the RAM digest and the workload (its RNG state)."""
    ram_mm = mmap.mmap(-1, config.ram_bytes)
    dirty = np.zeros(config.page_count, np.uint8)
    ram = GuestRam(ram_mm, dirty, config.write_size)
    fill_ram(ram.pages, fill_pages=config.data_pages, seed=config.seed,
             zero_fraction=config.zero_fraction, text_fraction=config.text_fraction)
    view = memoryview(ram_mm)
    table = KvTable(view, first_page=config.data_pages, pages=config.table_pages,
                    mark_page=ram.mark_page)
    workload = Workload(WorkloadSpec.from_config(config), ram, table)
    workload.run_units(units)
    digest = ram_digest(ram_mm)
    table.release()
    ram.release()
    view.release()
    ram_mm.close()
    return digest, workload
