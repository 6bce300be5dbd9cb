"""Fixtures for storage tests: seeded disk images with data, zero blocks and holes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from xmig.storage.raw import RawFileBackend

MiB = 1 << 20


def make_image(path: Path, size: int, seed: int, *, fill: float = 0.5) -> RawFileBackend:
    """A sparse image: in each MiB, with probability ``fill``, random 4 KiB-aligned data
    runs (some of them all zeros, written: zero blocks that are not holes); else a hole."""
    rng = np.random.default_rng(seed)
    img = RawFileBackend.create(path, size)
    for mib in range(0, size, MiB):
        if rng.random() >= fill:
            continue
        start = mib + int(rng.integers(0, 128)) * 4096
        length = min(int(rng.integers(1, 256)) * 4096, size - start)
        if length <= 0:
            continue
        data = rng.bytes(length) if rng.random() < 0.8 else bytes(length)
        img.pwrite(start, data)
    return img


def file_bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


def allocated(path: Path) -> int:
    """Bytes of disk actually allocated to ``path``."""
    return os.stat(path).st_blocks * 512
