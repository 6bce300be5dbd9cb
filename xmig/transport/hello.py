"""The connection handshake's messages: the client's HELLO, the server's refusals. Sans-IO.

Every connection of a session starts with the client's HELLO (which session, which stream,
whether it is new, what it holds of each channel) and the server's WELCOME: the server's own
state, or a refusal whose ``code`` the client turns into a typed error (:data:`REFUSALS`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from xmig.errors import (
    AuthenticationError,
    PeerLimitExceeded,
    PeerNotAllowed,
    ProtocolError,
    SessionExpired,
    TransportError,
)
from xmig.transport.frames import Frame, FrameType, encode_frame

PROTOCOL = "xmig/1"


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
        body = {
            "protocol": PROTOCOL,
            "session": self.session_id,
            "stream": self.stream,
            "new": self.new,
            "max_payload": self.max_payload,
            "received": {str(k): v for k, v in self.received.items()},
            "holding": {str(k): v for k, v in self.holding.items()},
        }
        return encode_frame(FrameType.HELLO, 0, 0, json.dumps(body).encode())

    @classmethod
    def decode(cls, frame: Frame) -> Hello:
        if frame.type is not FrameType.HELLO:
            raise ProtocolError(f"expected HELLO as first frame, got {frame.type.name}")
        try:
            body = json.loads(frame.payload)
            if body["protocol"] != PROTOCOL:
                raise ProtocolError(f"peer speaks {body['protocol']!r}, not {PROTOCOL!r}")
            received = {int(k): int(v) for k, v in body.get("received", {}).items()}
            holding = {int(k): [int(x) for x in v] for k, v in body.get("holding", {}).items()}
            return cls(str(body["session"]), int(body["stream"]), bool(body["new"]),
                       int(body["max_payload"]), received, holding)
        except (ValueError, KeyError, TypeError) as err:
            raise ProtocolError(f"malformed HELLO: {err}") from err


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
    body = {"ok": False, "code": code, "error": error}
    return encode_frame(FrameType.WELCOME, 0, 0, json.dumps(body).encode())
