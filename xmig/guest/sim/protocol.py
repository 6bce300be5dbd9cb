"""The guest's UDP request/response protocol (one datagram each way).

Request (network byte order)::

    2s  magic  b"XS"
    u8  version 1
    u8  op      1 PING, 2 PUT, 3 GET
    u32 request id (echoed)
    PUT: u8 key length, key, value (the rest)      GET: key (the rest)      PING: nothing

Response::

    2s  magic  b"XS"
    u8  version 1
    u8  op | 0x80
    u32 request id
    u8  status  0 OK, 1 NOT_FOUND, 2 BAD_REQUEST, 3 TABLE_FULL
    GET: the value      PING: u64 the guest's progress counter      PUT: nothing

Keys are 1–48 bytes, values 0–192 bytes (a table slot, :mod:`xmig.guest.sim.table`).
A paused guest does not answer (its socket is closed); the destination binds the same address
when it resumes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"XS"
VERSION = 1
OP_PING, OP_PUT, OP_GET = 1, 2, 3
OK, NOT_FOUND, BAD_REQUEST, TABLE_FULL = 0, 1, 2, 3
REPLY_FLAG = 0x80

_REQUEST = struct.Struct("!2sBBI")
_REPLY = struct.Struct("!2sBBIB")
_PROGRESS = struct.Struct("!Q")


class ProtocolViolation(ValueError):
    """A datagram that is not a well-formed request or reply."""


@dataclass(frozen=True)
class Request:
    op: int
    rid: int
    key: bytes = b""
    value: bytes = b""

    def encode(self) -> bytes:
        head = _REQUEST.pack(MAGIC, VERSION, self.op, self.rid)
        if self.op == OP_PUT:
            return head + bytes([len(self.key)]) + self.key + self.value
        if self.op == OP_GET:
            return head + self.key
        return head

    @classmethod
    def decode(cls, data: bytes) -> Request:
        if len(data) < _REQUEST.size:
            raise ProtocolViolation("short request")
        magic, version, op, rid = _REQUEST.unpack_from(data)
        if magic != MAGIC or version != VERSION:
            raise ProtocolViolation("bad magic or version")
        body = data[_REQUEST.size :]
        if op == OP_PUT:
            if not body or len(body) < 1 + body[0]:
                raise ProtocolViolation("short PUT")
            return cls(op, rid, body[1 : 1 + body[0]], body[1 + body[0] :])
        if op == OP_GET:
            return cls(op, rid, body)
        if op == OP_PING:
            return cls(op, rid)
        raise ProtocolViolation(f"unknown op {op}")


@dataclass(frozen=True)
class Reply:
    op: int
    rid: int
    status: int
    payload: bytes = b""

    def encode(self) -> bytes:
        head = _REPLY.pack(MAGIC, VERSION, self.op | REPLY_FLAG, self.rid, self.status)
        return head + self.payload

    @classmethod
    def decode(cls, data: bytes) -> Reply:
        if len(data) < _REPLY.size:
            raise ProtocolViolation("short reply")
        magic, version, op, rid, status = _REPLY.unpack_from(data)
        if magic != MAGIC or version != VERSION or not op & REPLY_FLAG:
            raise ProtocolViolation("bad magic, version or op")
        return cls(op & ~REPLY_FLAG, rid, status, data[_REPLY.size :])

    @property
    def progress(self) -> int:
        """A PING reply's progress counter."""
        return int(_PROGRESS.unpack_from(self.payload)[0]) if len(self.payload) >= 8 else -1


def progress_payload(progress: int) -> bytes:
    return _PROGRESS.pack(progress & 0xFFFFFFFFFFFFFFFF)
