"""A fresh guest's RAM: the seeded mix of zero, text/code and random pages."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
import zstandard

from xmig.guest.sim.fill import fill_ram
from xmig.guest.sim.shm import ram_digest
from xmig.memory.guest import PAGE_SIZE

from .conftest import GuestFactory, MiB, small_config


def filled(seed: int, pages: int = 8192, reserved: int = 256) -> npt.NDArray[np.uint8]:
    ram = np.zeros((pages, PAGE_SIZE), np.uint8)
    fill_ram(ram, fill_pages=pages - reserved, seed=seed, zero_fraction=0.4, text_fraction=0.3)
    return ram


def classify(ram: npt.NDArray[np.uint8]) -> tuple[float, float, float]:
    """Fractions of (zero, incompressible, other) pages."""
    zero = ~ram.any(axis=1)
    compressor = zstandard.ZstdCompressor(level=1)
    incompressible = np.array(
        [len(compressor.compress(page.tobytes())) >= PAGE_SIZE - 64 for page in ram]
    ) & ~zero
    n = ram.shape[0]
    z, r = int(zero.sum()), int(incompressible.sum())
    return z / n, r / n, (n - z - r) / n


def test_mix_has_the_configured_proportions() -> None:
    ram = filled(seed=3)
    zero, random, text = classify(ram)
    assert 0.40 <= zero <= 0.43  # code pages add a few all-zero pages of their own
    assert random == pytest.approx(0.30, abs=0.02)
    assert text == pytest.approx(0.30, abs=0.03)
    assert not ram[-256:].any()  # the reserved table region stays zero


def test_text_pages_are_real_files() -> None:
    ram = filled(seed=3)
    text = ram.tobytes()
    assert b"def " in text and b"import " in text  # python sources
    assert b"\x7fELF" in text  # binaries


def test_fill_is_deterministic_per_seed() -> None:
    assert ram_digest(filled(seed=11).data) == ram_digest(filled(seed=11).data)
    assert ram_digest(filled(seed=11).data) != ram_digest(filled(seed=12).data)


def test_guest_reports_its_fill(guests: GuestFactory) -> None:
    config = small_config(ram_bytes=32 * MiB, zero_fraction=0.5, text_fraction=0.1)
    guest = guests(config, paused=True)
    pages = config.page_count
    assert guest.fill["zero_pages"] == round(0.5 * pages)
    assert guest.fill["text_pages"] == round(0.1 * pages)
    assert sum(guest.fill[k] for k in ("zero_pages", "text_pages", "random_pages")) == pages
    all_pages = np.arange(pages, dtype=np.int64)
    ram = np.frombuffer(guest.memory.read_pages(all_pages), np.uint8).reshape(pages, PAGE_SIZE)
    zero, random, _ = classify(ram)
    assert zero == pytest.approx(0.5, abs=0.02)
    assert random == pytest.approx(0.4, abs=0.02)
