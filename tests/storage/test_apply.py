"""Bulk planning, the wire codec, the destination applier, and the bulk/mirror race."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.storage.conftest import MiB, allocated, make_image
from xmig.errors import DiskTooSmall, StaleEpochError, StorageError
from xmig.storage.apply import DiskApplier, RangeSet, image_digest
from xmig.storage.bulk import BulkPlanner, data_runs
from xmig.storage.mirror import MirrorQueue
from xmig.storage.raw import RawFileBackend
from xmig.storage.wire import (
    Applied,
    BulkDone,
    BulkExtent,
    Failed,
    Hello,
    Message,
    MirrorBatch,
    MirrorRecord,
    Ready,
    decode,
    encode,
    error_of,
    failure,
)

K = 4096


class MemDisk:
    """An in-memory BlockBackend."""

    def __init__(self, size: int, fill: int = 0) -> None:
        self.buf = bytearray([fill]) * size

    @property
    def size(self) -> int:
        return len(self.buf)

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset:offset + length])

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.buf[offset:offset + len(data)] = data

    def flush(self) -> None:
        pass


# -- bulk planning ----------------------------------------------------------------------


def test_planner_skips_holes_and_zero_blocks(tmp_path: Path) -> None:
    size = 16 * MiB
    img = make_image(tmp_path / "a.raw", size, seed=3)
    planner = BulkPlanner(size, chunk=MiB)
    copy = bytearray(size)
    pos = 0
    while not planner.done:
        claim = planner.claim(img.data_extent(planner.cursor))
        assert claim.start == pos and claim.start <= claim.read_start <= claim.end
        assert claim.read_length <= MiB
        pos = claim.end
        for off, view in planner.runs(claim, img.pread(claim.read_start, claim.read_length)):
            copy[off:off + len(view)] = view
    assert pos == size and bytes(copy) == img.pread(0, size)
    stt = planner.stats
    assert stt.claimed_bytes == size
    assert stt.hole_bytes > size // 3  # the image is mostly holes
    assert stt.zero_bytes > 0  # and has written zero blocks
    assert stt.data_bytes + stt.zero_bytes + stt.hole_bytes == size
    assert stt.data_bytes < allocated(tmp_path / "a.raw")
    img.close()


def test_planner_without_extents_reads_everything() -> None:
    planner = BulkPlanner(3 * MiB + 5, chunk=MiB)
    claims = []
    while not planner.done:
        claims.append(planner.claim((planner.cursor, planner.size)))
    assert [(c.start, c.end) for c in claims] == [
        (0, MiB), (MiB, 2 * MiB), (2 * MiB, 3 * MiB), (3 * MiB, 3 * MiB + 5)]
    with pytest.raises(ValueError):
        planner.claim(None)
    done = BulkPlanner(MiB)
    assert done.claim(None).end == MiB and done.done


@settings(max_examples=200, deadline=None)
@given(blocks=st.lists(st.sampled_from([0, 1, 2]), max_size=24), tail=st.integers(0, 100),
       block=st.sampled_from([8, 512, 4096, 12]))
def test_data_runs_match_brute_force(blocks: list[int], tail: int, block: int) -> None:
    rng = np.random.default_rng(len(blocks) * 1000 + tail)
    parts = []
    for b in blocks:  # 0: zero block, 1: random, 2: one non-zero byte at the end
        if b == 0:
            parts.append(bytes(block))
        elif b == 1:
            parts.append(rng.bytes(block))
        else:
            parts.append(bytes(block - 1) + b"\x01")
    parts.append(bytes(tail % block))
    data = b"".join(parts)
    runs = data_runs(data, 1000, block)
    rebuilt = bytearray(len(data))
    prev_end = -1
    for off, view in runs:
        assert off > prev_end  # sorted, not adjacent (adjacent runs are merged)
        prev_end = off + len(view)
        rebuilt[off - 1000:off - 1000 + len(view)] = view
        assert (off - 1000) % block == 0
        assert all(any(view[i:i + block]) for i in range(0, len(view), block))
    assert bytes(rebuilt) == data


# -- wire codec -------------------------------------------------------------------------


def test_wire_round_trip_and_garbage() -> None:
    msgs: list[Message] = [
        Hello(3, 10 * MiB), Ready(3, 11 * MiB), BulkDone(3, 10 * MiB), Applied(3, 17, 4 * MiB),
        BulkExtent(3, 0, 2 * MiB, ((K, b"x" * K), (3 * K, b"y" * 10))),
        MirrorBatch(3, (MirrorRecord(1, 0, 5, b"hello"), MirrorRecord(2, K, K, None))),
    ]
    for msg in msgs:
        back = decode(bytearray(encode(msg)))
        assert encode(back) == encode(msg)
    for bad in [b"", b"\x63", encode(msgs[4])[:-1], encode(msgs[5]) + b"!",
                encode(BulkExtent(3, K, 2 * K, ((0, b"z"),)))]:
        with pytest.raises(StorageError):
            decode(bad)
    stale = StaleEpochError("old", epoch=2, current=5)
    err = error_of(decode(encode(failure(stale))))  # type: ignore[arg-type]
    assert isinstance(err, StaleEpochError) and (err.epoch, err.current) == (2, 5)
    assert type(error_of(failure(DiskTooSmall("x")))) is DiskTooSmall
    assert type(error_of(Failed(99, 0, 0, "?"))) is StorageError


# -- the applier ------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(adds=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 30)), max_size=30),
       cut=st.integers(0, 240), probe=st.tuples(st.integers(0, 240), st.integers(0, 60)))
def test_range_set_matches_a_bitmap(adds: list[tuple[int, int]], cut: int,
                                    probe: tuple[int, int]) -> None:
    rs = RangeSet()
    bits = [False] * 300
    for a, n in adds:
        rs.add(a, a + n)
        for i in range(a, a + n):
            bits[i] = True
    rs.drop_below(cut)
    for i in range(cut):
        bits[i] = False
    a, n = probe
    gaps = list(rs.gaps(a, a + n))
    uncovered = [i for i in range(a, a + n) if not bits[i]]
    assert [i for g in gaps for i in range(*g)] == uncovered
    assert all(g[0] < g[1] for g in gaps)


def applier(size: int = 64 * K, image_size: int | None = None, *, fresh: bool = True,
            epoch: int = 5) -> tuple[DiskApplier, MemDisk]:
    disk = MemDisk(image_size or size, fill=0 if fresh else 0xEE)
    ap = DiskApplier(disk, epoch=epoch, fresh=fresh)
    assert ap.hello(Hello(epoch, size)) == Ready(epoch, disk.size)
    return ap, disk


def test_destination_too_small_and_stale_hello() -> None:
    with pytest.raises(DiskTooSmall):
        applier(size=64 * K, image_size=63 * K)
    ap = DiskApplier(MemDisk(K), epoch=5)
    with pytest.raises(StaleEpochError) as info:
        ap.hello(Hello(4, K))
    assert (info.value.epoch, info.value.current) == (4, 5)
    with pytest.raises(StorageError):
        ap.apply_mirror(MirrorBatch(5, ()))  # data before Hello


def test_stale_epoch_writes_nothing_newer_epoch_is_adopted() -> None:
    ap, disk = applier()
    before = bytes(disk.buf)
    for msg in (MirrorBatch(4, (MirrorRecord(1, 0, 3, b"old"),)),
                BulkExtent(4, 0, K, ((0, b"o" * K),))):
        with pytest.raises(StaleEpochError):
            ap.apply_mirror(msg) if isinstance(msg, MirrorBatch) else ap.apply_bulk(msg)
    assert bytes(disk.buf) == before and ap.applied_seq == 0 and ap.bulk_pos == 0
    ap.apply_mirror(MirrorBatch(6, (MirrorRecord(1, 0, 3, b"new"),)))
    assert ap.epoch == 6 and disk.buf[:3] == b"new"
    with pytest.raises(StaleEpochError):
        ap.apply_mirror(MirrorBatch(5, (MirrorRecord(2, 0, 3, b"mid"),)))
    assert disk.buf[:3] == b"new"


def test_bad_batches_write_nothing() -> None:
    ap, disk = applier()
    for records in [
        (MirrorRecord(1, 0, 3, b"abc"), MirrorRecord(3, 0, 3, b"gap")),  # seq gap
        (MirrorRecord(1, 0, 3, b"abc"), MirrorRecord(2, 64 * K - 1, 3, b"end")),  # past end
        (MirrorRecord(1, 0, 4, b"abc"),),  # length mismatch
    ]:
        with pytest.raises(StorageError):
            ap.apply_mirror(MirrorBatch(5, records))
        assert not any(disk.buf) and ap.applied_seq == 0
    with pytest.raises(StorageError):
        ap.apply_bulk(BulkExtent(5, K, 2 * K, ()))  # does not start at bulk_pos
    with pytest.raises(StorageError):
        ap.apply_done(BulkDone(5, 64 * K))  # bulk copy not finished


def test_bulk_does_not_overwrite_newer_mirrored_bytes() -> None:
    """A mirrored write overtakes the bulk extent that read the old contents."""
    ap, disk = applier(fresh=False)
    ap.apply_mirror(MirrorBatch(5, (MirrorRecord(1, 2 * K + 100, 50, b"M" * 50),
                                    MirrorRecord(2, 3 * K, K, None))))
    ap.apply_bulk(BulkExtent(5, 0, 4 * K, ((K, b"B" * 2 * K),)))  # stale copy of the range
    expect = bytes(K) + b"B" * (K + 100) + b"M" * 50 + b"B" * (K - 150) + bytes(K)
    assert bytes(disk.buf[:4 * K]) == expect
    ap.apply_bulk(BulkExtent(5, 4 * K, 64 * K, ()))
    ap.apply_done(BulkDone(5, 64 * K))
    assert not any(disk.buf[4 * K:])  # zero parts were zeroed on a non-fresh image
    ap.apply_mirror(MirrorBatch(5, (MirrorRecord(3, 0, 2, b"ok"),)))  # after the bulk
    assert disk.buf[:2] == b"ok"


def test_fresh_sparse_destination_stays_sparse(tmp_path: Path) -> None:
    size = 32 * MiB
    src = make_image(tmp_path / "src.raw", size, seed=11, fill=0.2)
    dst = RawFileBackend.create(tmp_path / "dst.raw", size)
    ap = DiskApplier(dst, epoch=1, fresh=True)
    ap.hello(Hello(1, size))
    planner = BulkPlanner(size)
    while not planner.done:
        claim = planner.claim(src.data_extent(planner.cursor))
        runs = planner.runs(claim, src.pread(claim.read_start, claim.read_length))
        ap.apply_bulk(BulkExtent(1, claim.start, claim.end, tuple(runs)))
    ap.apply_done(BulkDone(1, size))
    assert image_digest(dst) == image_digest(src)
    assert allocated(tmp_path / "dst.raw") <= planner.stats.data_bytes + 64 * K
    assert allocated(tmp_path / "dst.raw") < allocated(tmp_path / "src.raw")
    src.close()
    dst.close()


# -- the bulk/mirror race ---------------------------------------------------------------

race_op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 127), st.integers(1, 16), st.integers(1, 255)),
    # writes at the cursor: spanning it, or just above it (twice: the interesting ones)
    st.tuples(st.just("edge"), st.integers(-8, 8), st.integers(1, 16), st.integers(1, 255)),
    st.tuples(st.just("edge"), st.integers(-4, 4), st.integers(1, 8), st.integers(1, 255)),
    st.just(("claim",)),  # the copier claims the next range (cursor moves)...
    st.just(("read",)),  # ...and reads it later: writes in between land in both
    st.just(("take",)),
    st.tuples(st.just("deliver"), st.booleans()),  # one message from bulk or mirror channel
    st.just(("ack",)),
)


@settings(max_examples=500, deadline=None)
@given(ops=st.lists(race_op, max_size=60), fresh=st.booleans(),
       chunk=st.sampled_from([K, 4 * K]))
def test_bulk_mirror_race(ops: list[tuple[Any, ...]], fresh: bool, chunk: int) -> None:
    """Guest writes, bulk claims, bulk reads, mirror takes and deliveries on the two channels
    interleave arbitrarily (each channel in order, the two channels in any order); after
    everything is delivered the destination equals the source."""
    size = 32 * K
    rng = np.random.default_rng(len(ops))
    source = MemDisk(size)
    source.buf[:] = rng.bytes(size)
    source.buf[8 * K:16 * K] = bytes(8 * K)  # zero blocks
    dest = MemDisk(size, fill=0 if fresh else 0xEE)
    ap = DiskApplier(dest, epoch=2, fresh=fresh)
    ap.hello(Hello(2, size))
    mirror = MirrorQueue(4 * K, 2)
    planner = BulkPlanner(size, chunk=chunk, block=512)
    claimed: list[tuple[int, int, int]] = []  # claims not yet read
    bulk_chan: list[BulkExtent | BulkDone] = []
    mirror_chan: list[MirrorBatch] = []
    sent_done = False

    def bulk_step(claim_only: bool) -> None:
        nonlocal sent_done
        if claim_only and not planner.done:
            c = planner.claim((planner.cursor, size))
            mirror.set_cursor(c.end)  # before the read
            claimed.append((c.start, c.read_start, c.end))
        elif not claim_only and claimed:
            start, read_start, end = claimed.pop(0)
            data = source.pread(read_start, end - read_start)
            runs = tuple(data_runs(data, read_start, 512))
            bulk_chan.append(BulkExtent(2, start, end, runs))
        if planner.done and not claimed and not sent_done:
            bulk_chan.append(BulkDone(2, size))
            sent_done = True

    def deliver(from_bulk: bool) -> None:
        if from_bulk and bulk_chan:
            msg = bulk_chan.pop(0)
            ap.apply_bulk(msg) if isinstance(msg, BulkExtent) else ap.apply_done(msg)
        elif mirror_chan:
            ap.apply_mirror(mirror_chan.pop(0))

    def take() -> None:
        writes = mirror.take(3 * K)
        if writes:
            mirror_chan.append(MirrorBatch(2, tuple(
                MirrorRecord(w.seq, w.offset, w.length, bytes(w.data)) for w in writes)))

    for o in ops:
        if o[0] == "edge":
            o = ("write", max(0, min(127, mirror.cursor // 256 + o[1])), *o[2:])
        if o[0] == "write":
            _, block, n, fill = o
            off = int(block) * 256
            data = bytes([int(fill)]) * min(int(n) * 256, size - off)
            source.pwrite(off, data)  # the local disk first, then the mirror
            mirror.submit(off, data, 0.0)
        elif o[0] in ("claim", "read"):
            bulk_step(o[0] == "claim")
        elif o[0] == "take":
            take()
        elif o[0] == "deliver":
            deliver(bool(o[1]))
        elif o[0] == "ack":
            mirror.on_applied(ap.applied_seq, 0.0)
    while not sent_done:  # finish: the copier completes, everything is delivered
        bulk_step(True)
        bulk_step(False)
    while bulk_chan or mirror_chan or not mirror.idle:
        take()
        deliver(True)
        deliver(False)
        mirror.on_applied(ap.applied_seq, 0.0)
    assert ap.bulk_done
    assert bytes(dest.buf) == bytes(source.buf)


def test_write_spanning_the_cursor_is_clipped() -> None:
    """The case the cursor clipping exists for: a write spanning the cursor, then a write
    just above it that is not mirrored; the copier then reads the latter. Were the first
    write mirrored whole, its stale bytes above the cursor would win on the destination."""
    size = 8 * K
    source, dest = MemDisk(size), MemDisk(size)
    ap = DiskApplier(dest, epoch=2, fresh=True)
    ap.hello(Hello(2, size))
    mirror = MirrorQueue(1 << 20, 2)
    planner = BulkPlanner(size, chunk=K, block=512)

    def copy_step() -> BulkExtent:
        c = planner.claim((planner.cursor, size))
        mirror.set_cursor(c.end)
        data = source.pread(c.read_start, c.read_length)
        return BulkExtent(2, c.start, c.end, tuple(data_runs(data, c.read_start, 512)))

    def write(off: int, data: bytes) -> None:
        source.pwrite(off, data)
        mirror.submit(off, data, 0.0)

    ap.apply_bulk(copy_step())
    write(K - 256, b"\x01" * 512)  # spans the cursor at K
    write(K, b"\x02" * 256)  # above the cursor: not mirrored
    extent = copy_step()
    writes = mirror.take(1 << 20)
    assert [(w.offset, w.length) for w in writes] == [(K - 256, 256)]
    batch = MirrorBatch(2, tuple(MirrorRecord(w.seq, w.offset, w.length, bytes(w.data))
                                 for w in writes))
    ap.apply_mirror(batch)  # the mirror overtakes the bulk extent
    ap.apply_bulk(extent)
    assert dest.buf[:2 * K] == source.buf[:2 * K]


def test_digest_and_allocation_helpers(tmp_path: Path) -> None:
    img = RawFileBackend.create(tmp_path / "d.raw", MiB)
    assert image_digest(img) == image_digest(MemDisk(MiB))
    assert allocated(tmp_path / "d.raw") == 0 or os.stat(tmp_path / "d.raw").st_blocks < 8
    img.close()
