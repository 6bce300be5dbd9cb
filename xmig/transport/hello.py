"""The connection handshake's messages: the client's HELLO, the server's refusals. Sans-IO.

Every connection of a session starts with the client's HELLO (which session, which stream,
whether it is new, what it holds of each channel) and the server's WELCOME: the server's own
state, or a refusal whose ``code`` the client turns into a typed error (:data:`REFUSALS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import msgspec

from xmig.errors import (
    AuthenticationError,
    PeerLimitExceeded,
    PeerNotAllowed,
    ProtocolError,
    SessionExpired,
    TransportError,
)
from xmig.protocol import strictjson
from xmig.transport.frames import Frame, FrameType, encode_frame

PROTOCOL = "xmig/1"


_Channel = Annotated[int, msgspec.Meta(ge=0, le=255)]
_Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
_Received = Annotated[dict[_Channel, _Count], msgspec.Meta(max_length=256)]
#: a side lists at most 4096 messages it holds out of order per channel
_Holding = Annotated[dict[_Channel, Annotated[list[_Count], msgspec.Meta(max_length=4096)]],
                     msgspec.Meta(max_length=256)]
_SessionId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
_Text = Annotated[str, msgspec.Meta(max_length=4096)]


class _HelloBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    protocol: Annotated[str, msgspec.Meta(max_length=64)]
    session: _SessionId
    stream: Annotated[int, msgspec.Meta(ge=0, le=2**62)]
    new: bool
    max_payload: Annotated[int, msgspec.Meta(ge=1, le=2**31)]
    received: _Received = {}
    holding: _Holding = {}


class Welcome(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The server's answer to HELLO: its own state of the session, or a refusal."""

    ok: bool
    session: Annotated[str, msgspec.Meta(max_length=64)] = ""
    received: _Received = {}
    holding: _Holding = {}
    code: Annotated[str, msgspec.Meta(max_length=64)] = ""  #: a refusal's, see REFUSALS
    error: _Text = ""

    def encode(self) -> bytes:
        return encode_frame(FrameType.WELCOME, 0, 0, msgspec.json.encode(self))

    @classmethod
    def decode(cls, payload: bytes | bytearray) -> Welcome:
        """ProtocolError for anything but a valid WELCOME (typed, whatever the bytes)."""
        return strictjson.decode(_welcome, payload, "WELCOME")


@dataclass(frozen=True)
class Hello:
    """The first frame a client sends on each connection."""

    session_id: str
    stream: int
    new: bool
    max_payload: int
    received: dict[int, int] = field(default_factory=dict)  #: channel -> messages held
    holding: dict[int, list[int]] = field(default_factory=dict)  #: and held out of order

    def encode(self) -> bytes:
        body = _HelloBody(PROTOCOL, self.session_id, self.stream, self.new, self.max_payload,
                          self.received, self.holding)
        return encode_frame(FrameType.HELLO, 0, 0, msgspec.json.encode(body))

    @classmethod
    def decode(cls, frame: Frame) -> Hello:
        """ProtocolError for anything but a valid HELLO (typed, whatever the bytes)."""
        if frame.type is not FrameType.HELLO:
            raise ProtocolError(f"expected HELLO as first frame, got {frame.type.name}")
        body = strictjson.decode(_hello, frame.payload, "HELLO")
        if body.protocol != PROTOCOL:
            raise ProtocolError(f"peer speaks {body.protocol!r}, not {PROTOCOL!r}")
        return cls(body.session, body.stream, body.new, body.max_payload,
                   dict(body.received), {k: list(v) for k, v in body.holding.items()})


_hello = msgspec.json.Decoder(_HelloBody)
_welcome = msgspec.json.Decoder(Welcome)


#: The codes a server refuses a connection with, and the error each is on the client.
REFUSALS: dict[str, type[TransportError]] = {
    "unknown-session": SessionExpired,  # resuming a session the server does not have
    "incompatible": ProtocolError,  # HELLO's parameters differ from the server's
    "not-allowed": PeerNotAllowed,  # a valid certificate no --allow pattern matches
    "not-owner": AuthenticationError,  # resuming a session another certificate opened
    "peer-limit": PeerLimitExceeded,  # the peer holds as many sessions/connections as allowed
}


def refusal(code: str, error: str) -> bytes:
    """A WELCOME frame that refuses a connection (``code``: one of :data:`REFUSALS`)."""
    return Welcome(ok=False, code=code, error=error[:4096]).encode()
