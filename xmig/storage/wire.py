"""The storage engine's messages on the transport's disk channels, and their codec.

Source → destination:
- on ``DISK_BULK``: :class:`Hello` (disk size, epoch) first, then :class:`BulkExtent` in
  cursor order, then :class:`BulkDone`;
- on ``DISK_MIRROR``: :class:`MirrorBatch` (mirrored writes in seq order).

Destination → source, on ``DISK_MIRROR``: :class:`Ready` (answers Hello), :class:`Applied`
(every mirror write up to ``seq`` and the bulk copy up to ``bulk_pos`` are written and
fsynced), :class:`Failed` (a typed error, then the destination stops).

Every message that writes carries the migration epoch (fencing, I3). Integers are
big-endian; a message that does not decode is a :class:`~xmig.errors.StorageError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from xmig.errors import (
    DiskFull,
    DiskNotFound,
    DiskTooSmall,
    StaleEpochError,
    StorageError,
)

Data = bytes | bytearray | memoryview

HELLO, READY, BULK, BULK_DONE, MIRROR, APPLIED, FAILED = range(1, 8)

_HELLO = struct.Struct(">BQQ")
_READY = struct.Struct(">BQQ")
_BULK = struct.Struct(">BQQQI")
_RUN = struct.Struct(">QI")
_DONE = struct.Struct(">BQQ")
_MIRROR = struct.Struct(">BQI")
_MW = struct.Struct(">QQIB")
_APPLIED = struct.Struct(">BQQQ")
_FAILED = struct.Struct(">BBQQ")

ZERO_FLAG = 1


@dataclass(frozen=True)
class Hello:
    epoch: int
    size: int  #: the source disk's size


@dataclass(frozen=True)
class Ready:
    epoch: int
    size: int  #: the destination image's size


@dataclass(frozen=True)
class BulkExtent:
    """The copier claimed ``[start, end)``: ``runs`` (offset, data) hold its non-zero
    parts, everything else in the range is zero."""

    epoch: int
    start: int
    end: int
    runs: tuple[tuple[int, Data], ...]


@dataclass(frozen=True)
class BulkDone:
    epoch: int
    size: int


@dataclass(frozen=True)
class MirrorRecord:
    seq: int
    offset: int
    length: int
    data: Data | None  #: None: zeros


@dataclass(frozen=True)
class MirrorBatch:
    epoch: int
    records: tuple[MirrorRecord, ...]


@dataclass(frozen=True)
class Applied:
    epoch: int
    seq: int
    bulk_pos: int


@dataclass(frozen=True)
class Failed:
    """The destination failed with a typed error (``code`` names its class)."""

    code: int
    epoch: int
    current: int
    message: str


Message = Hello | Ready | BulkExtent | BulkDone | MirrorBatch | Applied | Failed

# error classes by code, for Failed
_CODES: list[type[StorageError]] = [StorageError, DiskNotFound, DiskTooSmall, DiskFull,
                                    StaleEpochError]


def encode(msg: Message) -> bytes:
    if isinstance(msg, Hello):
        return _HELLO.pack(HELLO, msg.epoch, msg.size)
    if isinstance(msg, Ready):
        return _READY.pack(READY, msg.epoch, msg.size)
    if isinstance(msg, BulkExtent):
        parts: list[Data] = [_BULK.pack(BULK, msg.epoch, msg.start, msg.end, len(msg.runs))]
        parts += [_RUN.pack(off, len(data)) for off, data in msg.runs]
        parts += [data for _, data in msg.runs]
        return b"".join(parts)
    if isinstance(msg, BulkDone):
        return _DONE.pack(BULK_DONE, msg.epoch, msg.size)
    if isinstance(msg, MirrorBatch):
        parts = [_MIRROR.pack(MIRROR, msg.epoch, len(msg.records))]
        parts += [_MW.pack(r.seq, r.offset, r.length, ZERO_FLAG if r.data is None else 0)
                  for r in msg.records]
        parts += [r.data for r in msg.records if r.data is not None]
        return b"".join(parts)
    if isinstance(msg, Applied):
        return _APPLIED.pack(APPLIED, msg.epoch, msg.seq, msg.bulk_pos)
    return _FAILED.pack(FAILED, msg.code, msg.epoch, msg.current) + msg.message.encode()


def decode(buf: Data) -> Message:
    """Decode one message (its data fields are views into ``buf``)."""
    view = memoryview(buf)
    try:
        kind = view[0]
        if kind == HELLO:
            _, epoch, size = _HELLO.unpack(view)
            return Hello(epoch, size)
        if kind == READY:
            _, epoch, size = _READY.unpack(view)
            return Ready(epoch, size)
        if kind == BULK:
            _, epoch, start, end, n = _BULK.unpack_from(view)
            pos = _BULK.size
            _check_count(view, pos, n, _RUN.size)
            heads = [_RUN.unpack_from(view, pos + i * _RUN.size) for i in range(n)]
            pos += n * _RUN.size
            runs = []
            for off, length in heads:
                if off < start or off + length > end:
                    raise StorageError(f"bulk run {off}+{length} outside [{start}, {end})")
                runs.append((off, view[pos:pos + length]))
                pos += length
            _check_len(view, pos)
            return BulkExtent(epoch, start, end, tuple(runs))
        if kind == BULK_DONE:
            _, epoch, size = _DONE.unpack(view)
            return BulkDone(epoch, size)
        if kind == MIRROR:
            _, epoch, n = _MIRROR.unpack_from(view)
            pos = _MIRROR.size
            _check_count(view, pos, n, _MW.size)
            heads = [_MW.unpack_from(view, pos + i * _MW.size) for i in range(n)]
            pos += n * _MW.size
            records = []
            for seq, off, length, flags in heads:
                data = None
                if not flags & ZERO_FLAG:
                    data = view[pos:pos + length]
                    pos += length
                records.append(MirrorRecord(seq, off, length, data))
            _check_len(view, pos)
            return MirrorBatch(epoch, tuple(records))
        if kind == APPLIED:
            _, epoch, seq, bulk_pos = _APPLIED.unpack(view)
            return Applied(epoch, seq, bulk_pos)
        if kind == FAILED:
            _, code, epoch, current = _FAILED.unpack_from(view)
            return Failed(code, epoch, current, bytes(view[_FAILED.size:]).decode(errors="replace"))
    except (struct.error, IndexError) as err:
        raise StorageError(f"malformed disk message: {err}") from err
    raise StorageError(f"unknown disk message kind {kind}")


def _check_count(view: memoryview, pos: int, count: int, size: int) -> None:
    """Refuse a count of ``size``-byte entries at ``pos`` that ``view`` cannot hold, before
    anything is made for them."""
    if count * size > len(view) - pos:
        raise StorageError(f"malformed disk message: {count} entries of {size} bytes in "
                           f"{len(view) - pos}")


def _check_len(view: memoryview, pos: int) -> None:
    if pos != len(view):
        raise StorageError(f"malformed disk message: {len(view)} bytes, {pos} described")


def failure(err: StorageError) -> Failed:
    """The :class:`Failed` message that carries ``err`` to the peer."""
    code = max(i for i, cls in enumerate(_CODES) if isinstance(err, cls))
    epoch = err.epoch if isinstance(err, StaleEpochError) else 0
    current = err.current if isinstance(err, StaleEpochError) else 0
    return Failed(code, epoch, current, str(err))


def error_of(msg: Failed) -> StorageError:
    """The typed error a :class:`Failed` message carries."""
    cls = _CODES[msg.code] if msg.code < len(_CODES) else StorageError
    text = f"destination: {msg.message}"
    if cls is StaleEpochError:
        return StaleEpochError(text, epoch=msg.epoch, current=msg.current)
    return cls(text)
