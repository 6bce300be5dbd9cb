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

    ``feed`` buffers bytes; ``next_frame`` returns the next whole frame or ``None``.
    A bad frame raises and stays in the buffer: the connection must be dropped.
    """

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_frame(self) -> Frame | None:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER_SIZE:
            return None
        magic, version, ftype, channel, flags, _reserved, length, seq = HEADER.unpack_from(
            buf, pos
        )
        if magic != MAGIC:
            raise BadMagicError(f"bad frame magic {magic:#06x} at stream offset {pos}")
        if version != VERSION:
            raise UnsupportedVersionError(f"frame version {version}, this build speaks {VERSION}")
        if ftype not in _TYPES:
            raise UnknownFrameTypeError(f"unknown frame type {ftype}")
        if length > self.max_payload:
            raise OversizedFrameError(length, self.max_payload)
        end = pos + HEADER_SIZE + length
        if len(buf) < end:
            return None
        with memoryview(buf) as view:
            digest = xxhash.xxh3_64(view[pos : pos + HEADER.size])
            digest.update(view[pos + HEADER_SIZE : end])
            (expected,) = CHECKSUM.unpack_from(buf, pos + HEADER.size)
            if digest.intdigest() != expected:
                raise FrameChecksumError(
                    f"checksum mismatch on {FrameType(ftype).name} frame channel={channel} "
                    f"seq={seq}"
                )
            payload = bytes(view[pos + HEADER_SIZE : end])
        self._pos = end
        return Frame(FrameType(ftype), channel, seq, payload, flags)

    def close(self) -> None:
        """The stream ended: raise if it ended inside a frame."""
        if self.buffered:
            raise TruncatedFrameError(f"stream ended {self.buffered} bytes into a frame")
