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
    FrameError,
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


Payload = bytes | bytearray  # large payloads are delivered in the buffer they were read into


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame."""

    type: FrameType
    channel: int
    seq: int
    payload: Payload
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

    Two ways in: ``feed(data)`` copies bytes in; or, from an ``asyncio.BufferedProtocol``,
    ``get_buffer()`` / ``buffer_updated(n)`` let the socket (or the TLS layer) write straight
    into the decoder's buffers, so a payload is written once, into the buffer it is delivered
    in. ``next_frame`` returns the next whole, verified frame or ``None``.

    A bad frame makes the decoder refuse: ``next_frame`` returns the good frames before it,
    then raises the :class:`~xmig.errors.FrameError` every time; nothing of the bad frame (or
    after it) is ever returned. The connection must be dropped.
    """

    SCRATCH = 64 * 1024  # read size while looking for a header; small frames come in bulk

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._scratch = bytearray(self.SCRATCH)
        self._head = bytearray()  # header bytes of the frame being read
        self._fields: tuple[int, int, int, int, int] | None = None  # type, channel, flags, seq, crc
        self._payload = bytearray()
        self._got = 0  # payload bytes filled
        self._frames: deque[Frame] = deque()
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames (whole frames and a partial one)."""
        queued = sum(HEADER_SIZE + len(f.payload) for f in self._frames)
        return queued + len(self._head) + self._got

    def get_buffer(self) -> memoryview:
        """Where the next received bytes go (then call :meth:`buffer_updated`)."""
        if self._fields is not None and self._error is None:
            return memoryview(self._payload)[self._got :]
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last :meth:`get_buffer`."""
        if self._error is not None:
            return
        if self._fields is not None:
            self._got += nbytes
            if self._got == len(self._payload):
                self._finish()
            return
        self._parse(memoryview(self._scratch)[:nbytes])

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` in."""
        view = memoryview(data).cast("B")
        while view and self._error is None:
            buf = self.get_buffer()
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

    def _parse(self, view: memoryview) -> None:
        while view and self._error is None:
            if self._fields is not None:  # the start of a payload came with its header
                n = min(len(view), len(self._payload) - self._got)
                self._payload[self._got : self._got + n] = view[:n]
                self._got += n
                view = view[n:]
                if self._got == len(self._payload):
                    self._finish()
                continue
            need = HEADER_SIZE - len(self._head)
            self._head += view[:need]
            view = view[need:]
            if len(self._head) < HEADER_SIZE:
                return
            try:
                length = self._check_header()
            except FrameError as err:
                self._error = err
                return
            self._payload = bytearray(length)
            self._got = 0
            if not length:
                self._finish()

    def _check_header(self) -> int:
        magic, version, ftype, channel, flags, _reserved, length, seq = HEADER.unpack_from(
            self._head
        )
        if magic != MAGIC:
            raise BadMagicError(f"bad frame magic {magic:#06x}")
        if version != VERSION:
            raise UnsupportedVersionError(f"frame version {version}, this build speaks {VERSION}")
        if ftype not in _TYPES:
            raise UnknownFrameTypeError(f"unknown frame type {ftype}")
        if length > self.max_payload:
            raise OversizedFrameError(length, self.max_payload)
        (crc,) = CHECKSUM.unpack_from(self._head, HEADER.size)
        self._fields = (ftype, channel, flags, seq, crc)
        return int(length)

    def _finish(self) -> None:
        assert self._fields is not None
        ftype, channel, flags, seq, crc = self._fields
        digest = xxhash.xxh3_64(memoryview(self._head)[: HEADER.size])
        digest.update(self._payload)
        if digest.intdigest() != crc:
            self._error = FrameChecksumError(
                f"checksum mismatch on {FrameType(ftype).name} frame channel={channel} seq={seq}"
            )
            return
        payload = self._payload if len(self._payload) > self.SCRATCH else bytes(self._payload)
        self._frames.append(Frame(FrameType(ftype), channel, seq, payload, flags))
        self._head = bytearray()
        self._fields = None
        self._payload = bytearray()
        self._got = 0

    def next_frame(self) -> Frame | None:
        if self._frames:
            return self._frames.popleft()
        if self._error is not None:
            raise self._error
        return None

    def close(self) -> None:
        """The stream ended: raise if it ended inside a frame."""
        if self._error is None and (self._head or self._got):
            raise TruncatedFrameError(
                f"stream ended {len(self._head) + self._got} bytes into a frame"
            )
