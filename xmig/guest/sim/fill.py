"""The initial contents of a fresh guest's RAM: a seeded mix of zero, text/code and random pages.

Pages come in runs (mean 32 pages, as free memory and page-cache files do in a real guest),
the runs of the three kinds shuffled together. Text and code pages are read from files on this
machine (``/usr/lib/python3*/*.py`` and ``/usr/bin`` binaries, alternately, in an order
drawn from the seed); when those run out they are reused at a shifted offset, so pages stay
distinct. The same seed on the same machine gives the same RAM, byte for byte.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from xmig.memory.guest import PAGE_SIZE

MEAN_RUN_PAGES = 32
MAX_BYTES_PER_FILE = 4 << 20
TEXT_GLOBS = ("/usr/lib/python3*/*.py", "/usr/lib/python3*/*/*.py")
CODE_GLOBS = ("/usr/bin/*",)

ZERO, TEXT, RANDOM = 0, 1, 2


@dataclass(frozen=True)
class FillStats:
    """Pages of each kind written by :func:`fill_ram` (table pages count as zero pages)."""

    zero_pages: int
    text_pages: int
    random_pages: int
    text_files: int


def _candidates(patterns: tuple[str, ...]) -> list[str]:
    found: set[str] = set()
    for pattern in patterns:
        for path in glob.glob(pattern):
            try:
                st = os.stat(path)
            except OSError:
                continue
            if st.st_size >= PAGE_SIZE and os.path.isfile(path) and os.access(path, os.R_OK):
                found.add(path)
    return sorted(found)


class TextSource:
    """A deterministic stream of real text and code bytes from files on this machine."""

    def __init__(self, rng: np.random.Generator) -> None:
        texts = _candidates(TEXT_GLOBS)
        codes = _candidates(CODE_GLOBS)
        order_t = [texts[i] for i in rng.permutation(len(texts))]
        order_c = [codes[i] for i in rng.permutation(len(codes))]
        self._files: list[str] = []
        for i in range(max(len(order_t), len(order_c))):
            self._files.extend(order[i] for order in (order_t, order_c) if i < len(order))
        self._rng = rng
        self._chunks = self._stream()
        self._pending = np.empty(0, np.uint8)
        self.files_read = 0

    def _stream(self) -> Iterator[bytes]:
        cycle = 0
        while True:
            produced = False
            for path in self._files:
                try:
                    with open(path, "rb") as f:
                        data = f.read(MAX_BYTES_PER_FILE + cycle * 1031)
                except OSError:
                    continue
                data = data[cycle * 1031 :]  # later cycles: shifted, so no page repeats
                if data:
                    produced = True
                    self.files_read += 1
                    yield data
            if not produced:  # no readable file on this machine: seeded pseudo-text
                letters = np.frombuffer(b"etaoin shrdlu\ncmfwyp,.vbgk", np.uint8)
                yield letters[self._rng.integers(0, letters.size, 1 << 20)].tobytes()
            cycle += 1

    def copy_into(self, out: npt.NDArray[np.uint8]) -> None:
        """Fill the flat array ``out`` with the next bytes of the stream."""
        at = 0
        while at < out.size:
            if not self._pending.size:
                self._pending = np.frombuffer(next(self._chunks), np.uint8)
            n = min(out.size - at, self._pending.size)
            out[at : at + n] = self._pending[:n]
            self._pending = self._pending[n:]
            at += n


def _runs(quota: int, rng: np.random.Generator) -> list[int]:
    """Run lengths (geometric, mean :data:`MEAN_RUN_PAGES`) that sum to ``quota``."""
    runs: list[int] = []
    left = quota
    while left > 0:
        n = int(min(rng.geometric(1 / MEAN_RUN_PAGES), left))
        runs.append(n)
        left -= n
    return runs


def fill_ram(
    ram: npt.NDArray[np.uint8],
    *,
    fill_pages: int,
    seed: int,
    zero_fraction: float,
    text_fraction: float,
) -> FillStats:
    """Fill pages ``[0, fill_pages)`` of ``ram`` (shape ``(pages, PAGE_SIZE)``, all zeros on
    entry, e.g. a fresh sparse file); the pages above stay zero. Fractions are of all pages."""
    pages = ram.shape[0]
    seeds = np.random.SeedSequence([seed, 0xF111]).spawn(3)
    layout_rng = np.random.Generator(np.random.PCG64(seeds[0]))
    random_bits = np.random.SFC64(seeds[1])
    reserved = pages - fill_pages
    zero_q = max(0, min(fill_pages, round(zero_fraction * pages) - reserved))
    text_q = min(fill_pages - zero_q, round(text_fraction * pages))
    random_q = fill_pages - zero_q - text_q
    kinds = [(ZERO, n) for n in _runs(zero_q, layout_rng)]
    kinds += [(TEXT, n) for n in _runs(text_q, layout_rng)]
    kinds += [(RANDOM, n) for n in _runs(random_q, layout_rng)]
    order = layout_rng.permutation(len(kinds))
    text = TextSource(np.random.Generator(np.random.PCG64(seeds[2]))) if text_q else None
    page = 0
    for i in order:
        kind, n = kinds[i]
        if kind == TEXT and text is not None:
            text.copy_into(ram[page : page + n].reshape(-1))
        elif kind == RANDOM:
            raw = random_bits.random_raw(n * PAGE_SIZE // 8)
            ram[page : page + n] = raw.view(np.uint8).reshape(n, PAGE_SIZE)
        page += n
    return FillStats(zero_q + reserved, text_q, random_q, text.files_read if text else 0)
