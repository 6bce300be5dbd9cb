"""Check (and repair) the destination QEMU's RAM against the source's, both paused.

Why: QEMU 7.2 under TCG loses dirty pages in a multi-pass migration of a guest that dirties
memory (measured here: the test guest's ``mem`` workload at 4 MiB/s over a 12 MB/s stream
crashed the destination kernel in 6 runs of 8, natively without xmig too; with the ``cpu``
workload, or one fast pass, it survived). Both guests' RAM is a shared file
(``memory-backend-file,share=on``), so each agent can read its own guest's RAM while it is
paused: the source from ``pre-switchover`` on (its vCPUs are stopped; the final pass only
reads RAM), the destination once its incoming migration completed (still paused, ``-S``).

The source hashes its RAM (xxh3-64 per chunk) from the pause on, while the last pass is still
crossing, and sends the digests to the destination (:func:`encode_digest_messages`); the
destination hashes its own once its QEMU completed, compares every chunk, and names the
chunks that differ in READY (:func:`encode_chunks`); the source sends their bytes
(:func:`encode_fixups`) before GO; the destination writes them into its RAM file before
``cont``. No extra round trip: the digests cross with the last pass, the verdict rides on
READY, the repair on the way of GO. (The destination's digests in READY instead, 128 KiB per
128 MiB of RAM on the return direction, which carried little before: about 250 ms from
READY sent to READY received at 1 Gbit × 100 ms, 50 ms of it the link's delay.) This also
checks I5 (memory at resume equals memory at pause), by digest, for every migration.
"""

from __future__ import annotations

import base64
import mmap
import os
import struct
from pathlib import Path

import numpy as np
import numpy.typing as npt
import xxhash

from xmig.errors import ProtocolError, QemuError

#: 8 KiB: the digests (8 B per chunk: 128 KiB for 128 MiB of RAM) and the repair
#: (the pages QEMU lost, ~35 per migration in the tests) both stay small; at 64 KiB the
#: repair was 2.3 MB, 185 ms at 100 Mbit/s, in the blackout
CHUNK = 8 * 1024
_HEAD = struct.Struct("<III")  # chunk size, count, more messages follow (0/1)
MESSAGE_BYTES = 2 << 20  #: a fixup message's size at most (under the session's max payload)
_ITEM = struct.Struct("<QI")  # offset, length

Digests = npt.NDArray[np.uint64]


def ram_digests(path: str | os.PathLike[str], chunk: int = CHUNK) -> Digests:
    """The chunk digests of the RAM file at ``path`` (blocking: run it in a thread). Read
    through a mapping of the file: no copy (128 MiB: 30 ms here, 50-200 ms with reads)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        raise QemuError(f"cannot read guest RAM {path}: {err}") from err
    try:
        size = os.fstat(fd).st_size
        count = -(-size // chunk)
        if not size:
            return np.zeros(0, np.uint64)
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as ram:
            view = memoryview(ram)
            try:
                return np.fromiter(
                    (xxhash.xxh3_64_intdigest(view[off:off + chunk])
                     for off in range(0, size, chunk)), np.uint64, count=count)
            finally:
                view.release()
    except OSError as err:
        raise QemuError(f"cannot read guest RAM {path}: {err}") from err
    finally:
        os.close(fd)


_DIGESTS_HEAD = struct.Struct("<QQI")  # first chunk, chunks in all, more messages follow


def encode_digest_messages(digests: Digests,
                           message_bytes: int = MESSAGE_BYTES) -> list[bytes]:
    """``digests`` as messages of at most about ``message_bytes`` (at least one; the last
    says no more follow)."""
    per = max(1, message_bytes // 8)
    raw = digests.astype("<u8")
    starts = list(range(0, len(raw), per)) or [0]
    return [_DIGESTS_HEAD.pack(start, len(raw), int(k + 1 < len(starts)))
            + raw[start:start + per].tobytes() for k, start in enumerate(starts)]


class DigestAssembler:
    """Collects :func:`encode_digest_messages`' messages back into the digests.

    ``chunks``, when given, is how many chunks this side's RAM has: the peer's count must
    match it, which bounds what the assembler keeps (without it, the peer's messages are
    kept until the count they announced is reached). A bad message raises
    :class:`ProtocolError` and changes nothing."""

    def __init__(self, chunks: int | None = None) -> None:
        self._parts: list[Digests] = []
        self._next = 0
        self.chunks = chunks
        self.total: int | None = None
        self.done = False

    def add(self, message: bytes | bytearray) -> bool:
        """Take the next message; True once the last one arrived."""
        if len(message) < _DIGESTS_HEAD.size or (len(message) - _DIGESTS_HEAD.size) % 8:
            raise ProtocolError("bad RAM digests message")
        start, total, more = _DIGESTS_HEAD.unpack_from(message, 0)
        if self.done or start != self._next or (self.total is not None and total != self.total):
            raise ProtocolError("RAM digests messages out of order")
        if self.chunks is not None and total != self.chunks:
            raise ProtocolError(f"RAM digests of {total} chunks, this RAM has {self.chunks}")
        end = self._next + (len(message) - _DIGESTS_HEAD.size) // 8
        if end > total or (not more and end != total):
            raise ProtocolError(f"RAM digests: {end} of {total}")
        part = np.frombuffer(bytes(message[_DIGESTS_HEAD.size:]), dtype="<u8")
        self._parts.append(part.astype(np.uint64))
        self.total = total
        self._next = end
        self.done = not more
        return self.done

    def digests(self) -> Digests:
        if not self.done:
            raise ProtocolError("RAM digests incomplete")
        return np.concatenate(self._parts) if self._parts else np.zeros(0, np.uint64)


def encode_chunks(chunks: npt.NDArray[np.int64]) -> str:
    """Chunk numbers (the ones that differ) for READY."""
    return base64.b64encode(chunks.astype("<u4").tobytes()).decode()


def decode_chunks(text: str, count: int) -> npt.NDArray[np.int64]:
    """:func:`encode_chunks`' chunk numbers, each checked against ``count`` chunks."""
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as err:
        raise ProtocolError(f"bad RAM chunk list: {err}") from err
    if len(raw) % 4:
        raise ProtocolError("bad RAM chunk list: not a whole number of entries")
    chunks = np.frombuffer(raw, dtype="<u4").astype(np.int64)
    if chunks.size and int(chunks.max()) >= count:
        raise ProtocolError(f"RAM chunk {int(chunks.max())} out of range ({count} chunks)")
    return chunks


def encode_digests(digests: Digests) -> str:
    return base64.b64encode(digests.astype("<u8").tobytes()).decode()


def decode_digests(text: str) -> Digests:
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as err:
        raise ProtocolError(f"bad RAM digests: {err}") from err
    if len(raw) % 8:
        raise ProtocolError("bad RAM digests: not a whole number of digests")
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)


def differing(mine: Digests, theirs: Digests) -> npt.NDArray[np.int64]:
    """Chunk numbers whose digests differ (a size mismatch is a typed error)."""
    if mine.shape != theirs.shape:
        raise QemuError(f"guest RAM sizes differ: {len(mine)} chunks here, "
                        f"{len(theirs)} on the destination")
    return np.flatnonzero(mine != theirs).astype(np.int64)


def encode_fixups(path: str | os.PathLike[str], chunks: npt.NDArray[np.int64],
                  chunk: int = CHUNK, message_bytes: int = MESSAGE_BYTES) -> list[bytes]:
    """The bytes of ``chunks`` of the RAM file, as messages of at most about
    ``message_bytes`` (at least one; the last says no more follow). Blocking."""
    per = max(1, message_bytes // (chunk + _ITEM.size))
    groups = [chunks[i:i + per] for i in range(0, len(chunks), per)] or [chunks[:0]]
    out = []
    with open(path, "rb") as ram:
        for k, group in enumerate(groups):
            parts = [_HEAD.pack(chunk, len(group), int(k + 1 < len(groups)))]
            for c in group:
                offset = int(c) * chunk
                data = os.pread(ram.fileno(), chunk, offset)
                parts += [_ITEM.pack(offset, len(data)), data]
            out.append(b"".join(parts))
    return out


def _fixup_items(view: memoryview, size: int) -> tuple[list[tuple[int, memoryview]], bool]:
    """A fixup message's (offset, bytes) items, each checked against a RAM file of ``size``
    bytes, and whether more messages follow."""
    if len(view) < _HEAD.size:
        raise ProtocolError("truncated RAM fixup message")
    _chunk, count, more = _HEAD.unpack_from(view, 0)
    if count > (len(view) - _HEAD.size) // _ITEM.size:
        raise ProtocolError(f"RAM fixup message of {len(view)} bytes cannot hold {count} items")
    items = []
    pos = _HEAD.size
    for _ in range(count):
        if pos + _ITEM.size > len(view):
            raise ProtocolError("truncated RAM fixup message")
        offset, length = _ITEM.unpack_from(view, pos)
        pos += _ITEM.size
        if pos + length > len(view) or offset + length > size:
            raise ProtocolError("RAM fixup out of range")
        items.append((offset, view[pos:pos + length]))
        pos += length
    if pos != len(view):
        raise ProtocolError("trailing bytes in a RAM fixup message")
    return items, bool(more)


def apply_fixups(path: str | os.PathLike[str], message: bytes | bytearray) -> tuple[int, bool]:
    """Write a fixup message's chunks into the RAM file: how many, and whether more
    messages follow (blocking). The message is checked whole first: a bad one raises
    :class:`ProtocolError` and writes nothing."""
    try:
        size = Path(path).stat().st_size
    except OSError as err:
        raise QemuError(f"cannot write guest RAM {path}: {err}") from err
    items, more = _fixup_items(memoryview(message), size)
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            for offset, data in items:
                os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
    except OSError as err:
        raise QemuError(f"cannot write guest RAM {path}: {err}") from err
    return len(items), more
