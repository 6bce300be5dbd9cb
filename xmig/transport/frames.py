"""The frame codec: sans-IO, bytes in, frames out.

Every frame is a 28-byte header and a payload::

     0      2   3    4       5     6        8        12       20         28
     +------+---+----+-------+-----+--------+--------+--------+----------+---------+
     |magic |ver|type|channel|flags|reserved| length |  seq   | checksum | payload |
     | "XM" |u8 | u8 |  u8   | u8  |  u16   |  u32   |  u64   |   u64    |         |
     +------+---+----+-------+-----+--------+--------+--------+----------+---------+

All integers are big-endian. ``checksum`` is xxh3-64 over the first 20 header bytes and
the payload: under TLS it catches bugs, in plaintext benchmark mode it catches tampering.
A frame that fails any check raises a :class:`~xmig.errors.FrameError` and leaves the
decoder exactly as it was, so nothing of it is ever delivered.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass

import xxhash

from xmig.errors import (
    BadMagicError,
    FrameChecksumError,
    OversizedFrameError,
    TruncatedFrameError,
    UnknownFrameTypeError,
    UnsupportedVersionError,
)

MAGIC = 0x584D
VERSION = 1
HEADER = struct.Struct("!HBBBBHIQ")  # the first 20 bytes, before the checksum
CHECKSUM = struct.Struct("!Q")
HEADER_SIZE = HEADER.size + CHECKSUM.size
DEFAULT_MAX_PAYLOAD = 4 * 1024 * 1024


class FrameType(enum.IntEnum):
    """What a frame carries."""

    DATA = 1  #: an application message on ``channel`` with sequence number ``seq``
    ACK = 2  #: the peer consumed every message of ``channel`` below ``seq``
    HELLO = 3  #: first frame of a connection from the client (JSON payload)
    WELCOME = 4  #: the server's answer to HELLO (JSON payload)
    PING = 5  #: liveness and RTT probe, ``seq`` is the probe id
    PONG = 6  #: answer to PING with the same ``seq``
    CLOSE = 7  #: orderly end of the session (UTF-8 reason)


_TYPES = frozenset(int(t) for t in FrameType)


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame."""

    type: FrameType
    channel: int
    seq: int
    payload: bytes
    flags: int = 0


def encode_header(
    ftype: FrameType, channel: int, seq: int, payload: bytes | memoryview, flags: int = 0
) -> bytes:
    """Return the header for ``payload``; send it followed by the payload itself."""
    head = HEADER.pack(MAGIC, VERSION, ftype, channel, flags, 0, len(payload), seq)
    digest = xxhash.xxh3_64(head)
    digest.update(payload)
    return head + CHECKSUM.pack(digest.intdigest())


def encode_frame(
    ftype: FrameType, channel: int, seq: int, payload: bytes = b"", flags: int = 0
) -> bytes:
    """Return a whole frame as one bytes object (for small frames and tests)."""
    return encode_header(ftype, channel, seq, payload, flags) + payload


class FrameDecoder:
    """Incremental decoder for one connection's byte stream.

    ``feed`` keeps the received chunks as they are; ``next_frame`` joins exactly the bytes
    of the next whole frame (one copy) or returns ``None``. A bad frame raises and stays
    in the buffer: the connection must be dropped.
    """

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._chunks: deque[memoryview] = deque()  # slices of memoryviews copy nothing
        self._size = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return self._size

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self._chunks.append(memoryview(data).cast("B"))
            self._size += len(data)

    def _peek(self, skip: int, n: int) -> list[memoryview]:
        """The ``n`` bytes after the first ``skip``, as slices of the chunks; consumes nothing."""
        parts = []
        for chunk in self._chunks:
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            part = chunk[skip : skip + n]
            skip = 0
            parts.append(part)
            n -= len(part)
            if not n:
                break
        return parts

    def _skip(self, n: int) -> None:
        chunks = self._chunks
        self._size -= n
        while n:
            first = chunks[0]
            if len(first) > n:
                chunks[0] = first[n:]
                return
            chunks.popleft()
            n -= len(first)

    def next_frame(self) -> Frame | None:
        if self._size < HEADER_SIZE:
            return None
        head = b"".join(self._peek(0, HEADER_SIZE))
        magic, version, ftype, channel, flags, _reserved, length, seq = HEADER.unpack_from(head)
        if magic != MAGIC:
            raise BadMagicError(f"bad frame magic {magic:#06x}")
        if version != VERSION:
            raise UnsupportedVersionError(f"frame version {version}, this build speaks {VERSION}")
        if ftype not in _TYPES:
            raise UnknownFrameTypeError(f"unknown frame type {ftype}")
        if length > self.max_payload:
            raise OversizedFrameError(length, self.max_payload)
        if self._size < HEADER_SIZE + length:
            return None
        digest = xxhash.xxh3_64(head[: HEADER.size])
        (expected,) = CHECKSUM.unpack_from(head, HEADER.size)
        # verify before consuming, so a bad frame leaves the decoder untouched
        parts = self._peek(HEADER_SIZE, length) if length else []
        payload = bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
        digest.update(payload)
        if digest.intdigest() != expected:
            raise FrameChecksumError(
                f"checksum mismatch on {FrameType(ftype).name} frame channel={channel} seq={seq}"
            )
        self._skip(HEADER_SIZE + length)
        return Frame(FrameType(ftype), channel, seq, payload, flags)

    def close(self) -> None:
        """The stream ended: raise if it ended inside a frame."""
        if self.buffered:
            raise TruncatedFrameError(f"stream ended {self.buffered} bytes into a frame")
