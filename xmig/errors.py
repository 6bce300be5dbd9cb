"""The one error tree of xmig.

Every error xmig raises on purpose is an :class:`XmigError`. Errors keep their cause
(``raise X from err``) and carry the context an operator needs (which peer, which channel,
which sequence number). ``asyncio.CancelledError`` is never wrapped.

::

    XmigError
     ├── ConfigError                 bad flags, arguments or files given by the operator
     ├── StateError                  an illegal transition of a state machine
     ├── TransportError
     │    ├── FrameError             a frame that does not decode; changes nothing
     │    │    ├── BadMagicError
     │    │    ├── UnsupportedVersionError
     │    │    ├── UnknownFrameTypeError
     │    │    ├── OversizedFrameError
     │    │    ├── TruncatedFrameError
     │    │    └── FrameChecksumError  (also an IntegrityError)
     │    ├── IntegrityError         TLS record or frame checksum failed: bytes were altered
     │    ├── SequenceError          a frame out of sequence on its channel
     │    ├── ProtocolError          a well-formed frame that the session state forbids
     │    ├── AuthenticationError    the peer's certificate was refused (or ours was)
     │    ├── ConnectionClosed       we closed it
     │    ├── ConnectionBroken       it broke (reset, timeout, EOF mid-frame)
     │    ├── PeerUnreachable        no connection could be made before the deadline
     │    └── SessionExpired         the peer stayed away past the resume deadline
     └── NetemError                  the WAN emulator could not be built or driven
          └── NetemPermissionError   it needs root (network namespaces, TUN)
"""

from __future__ import annotations


class XmigError(Exception):
    """Base of every error xmig raises on purpose."""


class ConfigError(XmigError):
    """Bad flags, arguments or input files."""


class StateError(XmigError):
    """An event that the current state of a state machine does not allow."""

    def __init__(self, message: str, *, state: str = "", event: str = "") -> None:
        super().__init__(message)
        self.state = state
        self.event = event


class TransportError(XmigError):
    """Anything that went wrong moving framed bytes between two agents."""


class FrameError(TransportError):
    """A frame that does not decode. The decoder's state is left unchanged."""


class BadMagicError(FrameError):
    """The bytes do not start with xmig's frame magic."""


class UnsupportedVersionError(FrameError):
    """A frame of a protocol version this build does not speak."""


class UnknownFrameTypeError(FrameError):
    """A frame type this build does not know."""


class OversizedFrameError(FrameError):
    """A frame longer than the negotiated maximum."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"frame payload of {length} bytes exceeds the limit of {limit}")
        self.length = length
        self.limit = limit


class TruncatedFrameError(FrameError):
    """The stream ended in the middle of a frame."""


class IntegrityError(TransportError):
    """Bytes were altered on the way: a TLS record or a frame checksum failed."""


class FrameChecksumError(FrameError, IntegrityError):
    """A frame whose checksum does not match its header and payload."""


class SequenceError(TransportError):
    """A data frame out of sequence on its channel (beyond the receive window)."""

    def __init__(self, message: str, *, channel: int, seq: int, expected: int) -> None:
        super().__init__(message)
        self.channel = channel
        self.seq = seq
        self.expected = expected


class ProtocolError(TransportError):
    """A well-formed frame that the session's state does not allow."""


class AuthenticationError(TransportError):
    """The TLS handshake failed: a certificate was refused."""


class ConnectionClosed(TransportError):
    """The session or connection was closed by this side."""


class ConnectionBroken(TransportError):
    """The connection broke: reset, timeout, or the peer went away."""


class PeerUnreachable(TransportError):
    """No connection to the peer could be made before the deadline."""


class SessionExpired(TransportError):
    """The peer stayed away past the resume deadline; the session is over."""


class NetemError(XmigError):
    """The WAN emulator could not be built or driven."""


class NetemPermissionError(NetemError):
    """The WAN emulator needs root (network namespaces, TUN devices)."""
