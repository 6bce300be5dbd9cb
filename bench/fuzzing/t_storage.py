"""Storage targets: the disk wire messages (``xmig.storage.wire.decode``) and what the
destination's :class:`~xmig.storage.apply.DiskApplier` makes of a sequence of them (Hello
first, then bulk extents, mirror batches, the end of the bulk copy), on an image in memory;
a typed error must leave the applier and the image as they were."""

from __future__ import annotations

import dataclasses
import functools
import random
import struct
from typing import Any, cast

import xxhash

from xmig.errors import StorageError
from xmig.storage import wire
from xmig.storage.apply import DiskApplier
from xmig.storage.wire import (
    Applied,
    BulkDone,
    BulkExtent,
    Failed,
    Hello,
    MirrorBatch,
    MirrorRecord,
    Ready,
)

from .core import ChangedOnError, Target
from .mutate import (
    bytes_mutation,
    extreme_int,
    join_messages,
    sequence_mutation,
    split_messages,
)

IMAGE = 64 << 10
EPOCH = 5


class OutOfRange(Exception):
    """A decoder wrote or read outside the image: it let a bad range through (a crash)."""


class MemBackend:
    """A :class:`~xmig.storage.disk.BlockBackend` in memory that refuses what is outside it."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    @property
    def size(self) -> int:
        return len(self.data)

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > len(self.data):
            raise OutOfRange(f"{offset}+{length} outside an image of {len(self.data)}")

    def pread(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return bytes(self.data[offset:offset + length])

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check(offset, len(data))
        self.data[offset:offset + len(data)] = data

    def flush(self) -> None:
        pass


class ZeroingMemBackend(MemBackend):
    def write_zeroes(self, offset: int, length: int) -> None:
        self._check(offset, length)
        self.data[offset:offset + length] = bytes(length)


def _wire_seeds() -> list[wire.Message]:
    return [
        Hello(EPOCH, IMAGE), Ready(EPOCH, IMAGE),
        BulkExtent(EPOCH, 0, 16384, ((0, b"a" * 512), (4096, b"b" * 4096))),
        BulkExtent(EPOCH, 16384, IMAGE, ()), BulkDone(EPOCH, IMAGE),
        MirrorBatch(EPOCH, (MirrorRecord(1, 0, 4, b"abcd"), MirrorRecord(2, 8192, 4096, None),
                            MirrorRecord(3, 512, 3, b"xyz"))),
        Applied(EPOCH, 3, 16384), Failed(4, 3, EPOCH, "stale ✓"),
    ]


def wire_seeds() -> list[bytes]:
    return list(_wire_seed_bytes())


@functools.cache
def _wire_seed_bytes() -> tuple[bytes, ...]:
    return tuple(wire.encode(m) for m in _wire_seeds())


def _mutate_parts(msg: BulkExtent | MirrorBatch, rng: random.Random) -> wire.Message:
    if isinstance(msg, BulkExtent):
        runs = list(msg.runs)
        k = rng.randrange(len(runs) + 1)
        off = extreme_int(rng, 8, runs[k - 1][0] if runs else 0, IMAGE)
        op = rng.random()
        if op < 0.4 or not runs:
            runs.insert(k, (off, rng.choice((b"", b"z", bytes(4096)))))
        elif op < 0.7:
            runs[k - 1] = (off, runs[k - 1][1])
        else:
            runs[k - 1:k] = [runs[k - 1]] * rng.choice((0, 2, 100))
        return dataclasses.replace(msg, runs=tuple(runs))
    recs = list(msg.records)
    k = rng.randrange(len(recs) + 1)
    if rng.random() < 0.4 or not recs:
        data = rng.choice((None, b"", b"q" * 7))
        recs.insert(k, MirrorRecord(extreme_int(rng), extreme_int(rng, 8, 0, IMAGE),
                                    len(data) if data is not None else extreme_int(rng, 4),
                                    data))
    else:
        r = recs[k - 1]
        name = rng.choice(("seq", "offset", "length"))
        width = 4 if name == "length" else 8
        change: dict[str, Any] = {name: extreme_int(rng, width, getattr(r, name), IMAGE)}
        recs[k - 1] = dataclasses.replace(r, **change)
    return dataclasses.replace(msg, records=tuple(recs))


def mutate_wire(data: bytes, rng: random.Random) -> bytes:
    """Decode with the module's decoder, change a field or a run or record, encode again;
    byte level when it does not decode (or one time in four)."""
    try:
        msg = wire.decode(data)
    except StorageError:
        msg = None
    if msg is None or rng.random() < 0.25:
        return bytes_mutation(data, rng, wire_seeds())
    if isinstance(msg, BulkExtent | MirrorBatch) and rng.random() < 0.6:
        new = _mutate_parts(msg, rng)
    else:
        ints = [f.name for f in dataclasses.fields(msg) if isinstance(getattr(msg, f.name), int)]
        name = rng.choice(ints)
        change = {name: extreme_int(rng, 8, getattr(msg, name), IMAGE)}
        new = dataclasses.replace(cast(Any, msg), **change)
    try:
        return wire.encode(new)
    except struct.error:  # a value too large for a u8 or u32 field
        return data


def run_wire(data: bytes) -> str:
    return type(wire.decode(data)).__name__


# -- the applier -------------------------------------------------------------------------


def _snapshot(a: DiskApplier, image: MemBackend) -> tuple[Any, ...]:
    rs = a._ahead
    return (a.epoch, a.bulk_pos, a.bulk_done, a.applied_seq, a.source_size, a.bytes_written,
            a.mirror_writes, tuple(rs._starts), tuple(rs._ends),
            xxhash.xxh3_64_intdigest(image.data))


def run_apply(data: bytes) -> str:
    """As the destination's disk receiver: the first message must be Hello, then bulk
    extents, BulkDone and mirror batches, each decoded and applied in turn."""
    msgs = split_messages(data)
    fresh = bool(xxhash.xxh32_intdigest(data) & 1)
    image: MemBackend = ZeroingMemBackend(IMAGE) if fresh else MemBackend(IMAGE)
    applier = DiskApplier(image, epoch=EPOCH, fresh=fresh)
    for k, raw in enumerate(msgs):
        before = _snapshot(applier, image)
        try:
            msg = wire.decode(raw)
            if k == 0:
                if not isinstance(msg, Hello):
                    raise StorageError(f"expected Hello, got {type(msg).__name__}")
                applier.hello(msg)
            elif isinstance(msg, BulkExtent):
                applier.apply_bulk(msg)
            elif isinstance(msg, BulkDone):
                applier.apply_done(msg)
            elif isinstance(msg, MirrorBatch):
                applier.apply_mirror(msg)
            else:
                raise StorageError(f"unexpected {type(msg).__name__}")
        except StorageError as err:
            if _snapshot(applier, image) != before:
                raise ChangedOnError(f"{type(err).__name__} ({err}) after changing the "
                                     "applier or the image") from err
            raise
    return "done" if applier.bulk_done else "applied" if msgs else "nothing"


def apply_seeds() -> list[bytes]:
    h, _r, b1, b2, done, mirror, _a, _f = wire_seeds()
    late = wire.encode(MirrorBatch(EPOCH + 1, (MirrorRecord(4, 100, 2, b"hi"),)))
    return [join_messages([h, b1, mirror, b2, done]), join_messages([h, mirror, b1, late]),
            join_messages([h, b1, b2, done, mirror]), join_messages([h])]


def _apply_nasty() -> list[bytes]:
    h = wire.encode(Hello(EPOCH, IMAGE))
    unordered = wire.encode(BulkExtent(EPOCH, 0, IMAGE, ((8192, b"b"), (0, b"a"))))
    bigger = wire.encode(Hello(EPOCH + 7, IMAGE * 2))
    over = wire.encode(MirrorBatch(EPOCH, (MirrorRecord(1, 0, 1, b"a"),
                                           MirrorRecord(2, IMAGE, 1, b"b"))))
    return [join_messages([h, unordered]), join_messages([bigger]), join_messages([h, over])]


def _wire_nasty() -> list[bytes]:
    many = struct.pack(">BQQQI", wire.BULK, 1, 0, 1 << 40, (1 << 32) - 1)
    mirror = struct.pack(">BQI", wire.MIRROR, 1, (1 << 32) - 1)
    zeros = struct.pack(">BQI", wire.MIRROR, 1, 1) + struct.pack(">QQIB", 1, 0, (1 << 32) - 1, 1)
    return [many, many + bytes(20 * 4096), mirror + bytes(25 * 4096), zeros, b"", b"\x07",
            bytes([wire.FAILED, 255]) + bytes(16) + b"\xff\xfe"]


TARGETS = [
    Target("storage_wire", run_wire, wire_seeds, mutate_wire, None, _wire_nasty),
    Target("storage_apply", run_apply, apply_seeds,
           lambda d, r: sequence_mutation(d, r, lambda m: mutate_wire(m, r)), None,
           _apply_nasty),
]
