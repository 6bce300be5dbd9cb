"""Check (and repair) the destination QEMU's RAM against the source's, both paused.

Why: QEMU 7.2 under TCG loses dirty pages in a multi-pass migration of a guest that dirties
memory (measured here: the test guest's ``mem`` workload at 4 MiB/s over a 12 MB/s stream
crashed the destination kernel in 6 runs of 8, natively without xmig too; with the ``cpu``
workload, or one fast pass, it survived). Both guests' RAM is a shared file
(``memory-backend-file,share=on``), so each agent can read its own guest's RAM while it is
paused: the source from ``pre-switchover`` on (its vCPUs are stopped; the final pass only
reads RAM), the destination once its incoming migration completed (still paused, ``-S``).

The destination sends the xxh3-64 digests of its RAM's chunks in READY; the source compares
them with its own and sends the chunks that differ (:func:`encode_fixups`) before GO; the
destination writes them into its RAM file before ``cont``. No extra round trip: the digests
ride on READY, the repair on the way of GO. This also checks I5 (memory at resume equals
memory at pause), by digest, for every migration.
"""

from __future__ import annotations

import base64
import os
import struct
from pathlib import Path

import numpy as np
import numpy.typing as npt

from xmig.digest import ChunkDigests
from xmig.errors import ProtocolError, QemuError

#: 8 KiB: the digests (8 B per chunk: 128 KiB for 128 MiB of RAM, in READY) and the repair
#: (the pages QEMU lost, ~35 per migration in the tests) both stay small; at 64 KiB the
#: repair was 2.3 MB, 185 ms at 100 Mbit/s, in the blackout
CHUNK = 8 * 1024
_HEAD = struct.Struct("<III")  # chunk size, count, more messages follow (0/1)
MESSAGE_BYTES = 2 << 20  #: a fixup message's size at most (under the session's max payload)
_ITEM = struct.Struct("<QI")  # offset, length

Digests = npt.NDArray[np.uint64]


def ram_digests(path: str | os.PathLike[str], chunk: int = CHUNK) -> Digests:
    """The chunk digests of the RAM file at ``path`` (blocking: run it in a thread)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        raise QemuError(f"cannot read guest RAM {path}: {err}") from err
    try:
        size = os.fstat(fd).st_size
        digests = ChunkDigests(size, chunk)
        digests.refresh(lambda off, n: os.pread(fd, n, off))
        return digests.digests.copy()
    finally:
        os.close(fd)


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


def apply_fixups(path: str | os.PathLike[str], message: bytes | bytearray) -> tuple[int, bool]:
    """Write a fixup message's chunks into the RAM file: how many, and whether more
    messages follow (blocking)."""
    view = memoryview(message)
    if len(view) < _HEAD.size:
        raise ProtocolError("truncated RAM fixup message")
    _chunk, count, more = _HEAD.unpack_from(view, 0)
    pos = _HEAD.size
    size = Path(path).stat().st_size
    fd = os.open(path, os.O_WRONLY)
    try:
        for _ in range(count):
            if pos + _ITEM.size > len(view):
                raise ProtocolError("truncated RAM fixup message")
            offset, length = _ITEM.unpack_from(view, pos)
            pos += _ITEM.size
            if pos + length > len(view) or offset + length > size:
                raise ProtocolError("RAM fixup out of range")
            os.pwrite(fd, view[pos:pos + length], offset)
            pos += length
    finally:
        os.close(fd)
    if pos != len(view):
        raise ProtocolError("trailing bytes in a RAM fixup message")
    return int(count), bool(more)
