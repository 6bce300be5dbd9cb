"""The memory interfaces over the shared RAM and dirty log, and the no-lost-write rule."""

from __future__ import annotations

import itertools
import math
import mmap
import threading
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from xmig.guest.sim import SimGuest, SimMemory
from xmig.guest.sim.shm import (
    CONTROL_BYTES,
    ControlBlock,
    SharedPaths,
    create_file,
    map_file,
    ram_digest,
)
from xmig.guest.sim.workloads import GuestRam
from xmig.memory.guest import PAGE_SIZE, DestinationMemory, SourceMemory

from .conftest import GuestFactory, MiB, small_config


def test_sim_memory_implements_both_protocols(guests: GuestFactory) -> None:
    memory = guests(small_config(), paused=True).memory
    source: SourceMemory = memory
    destination: DestinationMemory = memory
    assert source.page_count == destination.page_count == 16 * MiB // PAGE_SIZE


def test_first_fetch_returns_every_page_then_only_written_ones(guests: GuestFactory) -> None:
    guest = guests(small_config(workload="hotset", rate_Bps=20e6, hotset_bytes=256 * 1024))
    everything = guest.memory.fetch_and_clear_dirty()
    assert np.array_equal(everything, np.arange(guest.memory.page_count))
    guest.wait_until(lambda p: p.page_writes > 2000, timeout=5)
    guest.pause()
    dirty = guest.memory.fetch_and_clear_dirty()
    assert 0 < dirty.size <= 64  # the hot set
    assert dirty.dtype == np.int64 and np.all(np.diff(dirty) > 0)
    assert guest.memory.fetch_and_clear_dirty().size == 0


def test_write_read_zero_pages(guests: GuestFactory) -> None:
    memory = guests(small_config(), incoming=True).memory
    idx = np.array([3, 1, 4000], dtype=np.int64)
    data = np.random.default_rng(1).integers(0, 256, 3 * PAGE_SIZE, dtype=np.uint8).tobytes()
    memory.write_pages(idx, data)
    assert bytes(memory.read_pages(idx)) == data
    memory.zero_pages(idx[:2])
    assert bytes(memory.read_pages(idx[:2])) == bytes(2 * PAGE_SIZE)
    assert bytes(memory.read_pages(idx[2:])) == data[2 * PAGE_SIZE :]
    with pytest.raises(ValueError):
        memory.write_pages(idx, data[:-1])
    with pytest.raises(ValueError):
        memory.set_throttle(math.nan)


def test_attach_from_another_handle(guests: GuestFactory) -> None:
    guest = guests(small_config(), paused=True)
    other = SimMemory.open(guest.paths)
    try:
        assert other.page_count == guest.memory.page_count
        assert other.digest() == guest.digest()
    finally:
        other.close()


def test_no_write_is_lost_while_the_host_fetches_and_copies(guests: GuestFactory) -> None:
    """A guest hammers 16 pages as fast as it can while the host runs fetch-and-copy rounds
    (in a thread, racing with the pause too); after a final round on the paused guest, the
    copy equals the guest's RAM. Four pause/resume cycles."""
    config = small_config(workload="hotset", rate_Bps=math.inf, hotset_bytes=16 * PAGE_SIZE,
                          write_size=8)
    guest = guests(config)
    memory = guest.memory
    copy = np.zeros((memory.page_count, PAGE_SIZE), np.uint8)
    for _cycle in range(4):
        before = guest.progress()
        rounds = hammer_and_copy(guest, copy, seconds=0.25)
        # it raced the rounds (thousands of writes: 50,000 on an idle box, 11,700 once
        # with the other core busy, so not a speed test)
        assert rounds > 20 and guest.progress().page_writes > before.page_writes + 2_000
        assert ram_digest(copy.data) == guest.digest()
        guest.resume()


def hammer_and_copy(guest: SimGuest, copy: npt.NDArray[np.uint8], seconds: float) -> int:
    """Copy rounds in a thread for ``seconds`` of guest time; pause the guest while the
    rounds go on; one last round. Returns the rounds made."""
    memory = guest.memory
    rounds = 0
    stop = threading.Event()
    failures: list[BaseException] = []

    def copy_round() -> int:
        idx = memory.fetch_and_clear_dirty()
        pages = np.frombuffer(memory.read_pages(idx), np.uint8)
        copy[idx] = pages.reshape(idx.size, PAGE_SIZE)
        return int(idx.size)

    def copier() -> None:
        nonlocal rounds
        try:
            while not stop.is_set():
                copy_round()
                rounds += 1
        except BaseException as err:
            failures.append(err)

    thread = threading.Thread(target=copier)
    thread.start()
    start = guest.progress().last_progress_mono
    try:
        guest.wait_until(lambda p: p.last_progress_mono > start + seconds, timeout=20)
    finally:
        guest.pause()
        stop.set()
        thread.join()
    assert not failures
    copy_round()
    return rounds


def test_guest_marks_a_page_only_after_writing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each page's content when its dirty mark is set is already its final content."""
    ram = GuestRam(mmap.mmap(-1, 64 * PAGE_SIZE), np.zeros(64, np.uint8), write_size=256)
    seen: list[npt.NDArray[np.uint8]] = []
    original = GuestRam.mark

    def spying_mark(self: GuestRam, idx: npt.NDArray[np.int64]) -> None:
        seen.append(self.pages[idx].copy())
        original(self, idx)

    monkeypatch.setattr(GuestRam, "mark", spying_mark)
    idx = np.array([5, 9, 5], dtype=np.int64)
    data = np.arange(3 * 256, dtype=np.uint64).astype(np.uint8).reshape(3, 256)
    ram.write(idx, np.array([0, 3, 1], dtype=np.int64), data)
    assert np.array_equal(seen[0], ram.pages[idx])
    assert ram.dirty[5] == ram.dirty[9] == 1


INTERLEAVINGS = sorted(
    "".join(order) for order in set(itertools.permutations("SMFR"))
    if order.index("S") < order.index("M") and order.index("F") < order.index("R")
)


@pytest.mark.parametrize("order", INTERLEAVINGS)
def test_every_interleaving_of_a_write_and_a_fetch_loses_nothing(
    order: str, tmp_path: Path
) -> None:
    """Guest: Store then Mark; host: Fetch-and-clear then Read. Whatever the interleaving,
    one more host round leaves the host's copy equal to the guest's RAM."""
    pages = 8
    paths = SharedPaths(tmp_path / "r", tmp_path / "d", tmp_path / "c")
    for path, size in ((paths.ram, pages * PAGE_SIZE), (paths.dirty, pages),
                       (paths.control, CONTROL_BYTES)):
        create_file(path, size)
    control = ControlBlock(map_file(paths.control))
    control.init(0)
    control.close()
    guest = GuestRam(map_file(paths.ram), np.ndarray((pages,), np.uint8, buffer=map_file(
        paths.dirty)), write_size=PAGE_SIZE)
    host = SimMemory(paths, pages)
    copy = np.zeros((pages, PAGE_SIZE), np.uint8)
    fetched: list[npt.NDArray[np.int64]] = [np.empty(0, np.int64)]
    idx = np.array([3], dtype=np.int64)
    steps = {
        "S": lambda: guest.store(idx, np.zeros(1, np.int64), np.full((1, PAGE_SIZE), 7, np.uint8)),
        "M": lambda: guest.mark(idx),
        "F": lambda: fetched.__setitem__(0, host.fetch_and_clear_dirty()),
        "R": lambda: copy.__setitem__(fetched[0], np.frombuffer(
            host.read_pages(fetched[0]), np.uint8).reshape(-1, PAGE_SIZE)),
    }
    for step in order:
        steps[step]()
    steps["F"]()
    steps["R"]()
    assert np.array_equal(copy, guest.pages)
    guest.release()
    host.close()
