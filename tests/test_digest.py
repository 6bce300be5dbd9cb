"""Chunk digests kept current incrementally equal a fresh full read (xmig.digest)."""

from __future__ import annotations

import os
import random

import pytest

from xmig.digest import WORKER_NICE, ChunkDigests, space_digest, worker


def test_incremental_digest_equals_a_full_read_after_random_changes() -> None:
    rng = random.Random(7)
    space = bytearray(rng.randbytes(300_000))  # not a multiple of the chunk
    read = lambda off, n: bytes(space[off:off + n])  # noqa: E731
    kept = ChunkDigests(len(space), 4096)
    kept.refresh(read)
    for _ in range(200):
        off = rng.randrange(len(space))
        n = rng.randrange(1, 9000)
        space[off:off + n] = rng.randbytes(len(space[off:off + n]))
        kept.mark(off, off + n)
        if rng.random() < 0.3:
            kept.refresh(read, limit=rng.randrange(1, 5))
    kept.refresh(read)
    assert kept.digest() == space_digest(len(space), 4096, read)


def test_an_unmarked_change_is_caught_by_a_full_read() -> None:
    space = bytearray(64 * 1024)
    read = lambda off, n: bytes(space[off:off + n])  # noqa: E731
    kept = ChunkDigests(len(space), 4096, known_zero=True)
    assert kept.bytes_read == 0  # a known-zero space needs no reading
    assert kept.digest() == space_digest(len(space), 4096, read)
    space[5000] = 1  # changed, never marked: the kept digest is stale, a full read differs
    assert kept.digest() != space_digest(len(space), 4096, read)


def test_a_change_racing_a_refresh_stays_marked() -> None:
    # the mark is cleared before the chunk is read: a change marked during the read (here:
    # from inside the read) leaves the chunk stale for the next refresh
    space = bytearray(8192)
    kept = ChunkDigests(len(space), 4096)

    def read(off: int, n: int) -> bytes:
        data = bytes(space[off:off + n])
        if off == 0 and not space[0]:
            space[0] = 9
            kept.mark(0, 1)
        return data

    kept.refresh(read)
    assert kept.stale_count == 1
    kept.refresh(read)
    assert kept.digest() == space_digest(len(space), 4096, read)


def test_digest_of_stale_chunks_is_refused() -> None:
    kept = ChunkDigests(10_000, 4096)
    with pytest.raises(ValueError, match="stale"):
        kept.digest()


def test_the_worker_runs_at_a_lower_priority() -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    nice = worker().submit(lambda: os.getpriority(os.PRIO_PROCESS, 0)).result(timeout=10)
    assert nice == max(base, WORKER_NICE)  # per thread: this (calling) thread is unchanged
    assert os.getpriority(os.PRIO_PROCESS, 0) == base


def test_holes_need_no_reading_and_give_the_same_digest() -> None:
    space = bytearray(100_000)
    space[10_000:12_000] = b"d" * 2000
    space[70_000:70_001] = b"e"
    reads: list[tuple[int, int]] = []

    def read(off: int, n: int) -> bytes:
        reads.append((off, n))
        return bytes(space[off:off + n])

    kept = ChunkDigests(len(space), 4096)
    kept.zero_outside([(10_000, 12_000), (70_000, 70_001)])
    kept.refresh(read)
    assert sum(n for _, n in reads) == 2 * 4096  # chunk 2 (8192..12288) and chunk 17
    assert kept.digest() == space_digest(len(space), 4096, lambda o, n: bytes(space[o:o + n]))
