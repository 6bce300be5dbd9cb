"""The first pass's wire size, estimated from a seeded sample of the guest's data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xmig.convergence.sample import disk_wire_bytes, first_pass, memory_wire_ratio
from xmig.memory.guest import PAGE_SIZE
from xmig.memory.testing import ArrayMemory
from xmig.storage.raw import RawFileBackend

MiB = 1 << 20


def test_zero_memory_costs_nothing_and_random_memory_its_size() -> None:
    mem = ArrayMemory(4096)
    assert memory_wire_ratio(mem, seed=1)[0] == pytest.approx(0.0, abs=0.01)
    mem.pages[:] = np.random.default_rng(1).integers(0, 256, mem.pages.shape, np.uint8)
    ratio, written = memory_wire_ratio(mem, seed=1)
    assert 0.99 < ratio < 1.05 and 0.99 < written < 1.05


def test_half_zero_memory_is_half_its_size_on_the_wire_and_whole_where_written() -> None:
    mem = ArrayMemory(4096)
    rng = np.random.default_rng(2)
    mem.pages[::2] = rng.integers(0, 256, mem.pages[::2].shape, np.uint8)
    ratio, written = memory_wire_ratio(mem, seed=2)
    assert ratio == pytest.approx(0.5, abs=0.05)
    assert written == pytest.approx(1.0, abs=0.05)


def test_a_sparse_disk_counts_its_data_and_not_its_holes_or_zero_blocks(tmp_path: Path,
                                                                         ) -> None:
    disk = RawFileBackend.create(tmp_path / "d.raw", 64 * MiB)
    rng = np.random.default_rng(3)
    disk.pwrite(8 * MiB, rng.integers(0, 256, 4 * MiB, np.uint8).tobytes())
    disk.pwrite(40 * MiB, bytes(4 * MiB))  # allocated, but zeros: not sent
    allocated, wire = disk_wire_bytes(disk, seed=3)
    assert allocated == 8 * MiB
    assert wire == pytest.approx(4 * MiB, rel=0.15)
    disk.close()


def test_the_estimate_is_the_same_for_the_same_seed() -> None:
    mem = ArrayMemory(2048)
    mem.pages[::3, :100] = 7
    a, b = first_pass(mem, None, seed=5), first_pass(mem, None, seed=5)
    assert a == b and a.ram_bytes == 2048 * PAGE_SIZE and a.disk_wire_bytes == 0
    assert 0 < a.wire_bytes < a.ram_bytes
