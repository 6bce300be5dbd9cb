"""Bytes from a peer into typed, validated values: msgspec's JSON decoder for a schema, every
failure a :class:`~xmig.errors.ProtocolError` saying what and where (the control messages,
:mod:`xmig.protocol.control`; the connection handshake, :mod:`xmig.transport.hello`)."""

from __future__ import annotations

from typing import TypeVar

import msgspec

from xmig.errors import ProtocolError

T = TypeVar("T")


def decode(decoder: msgspec.json.Decoder[T], data: bytes | bytearray | memoryview,
           what: str) -> T:
    """``data`` decoded and validated by ``decoder``; ProtocolError ("malformed WHAT: ...")
    for anything else, whatever the bytes: nothing but a ProtocolError leaves here."""
    try:
        return decoder.decode(data)
    except msgspec.MsgspecError as err:
        raise ProtocolError(f"malformed {what}: {err}") from err
    except (RecursionError, MemoryError, UnicodeError) as err:  # defence in depth
        raise ProtocolError(f"malformed {what}: {type(err).__name__}") from err
