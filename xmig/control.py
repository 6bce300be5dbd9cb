"""The control messages between a source and a destination agent (CONTROL channel). Sans-IO.

One JSON object per message, with a ``type``. :func:`decode` checks the fields each type
needs and raises :class:`~xmig.errors.ProtocolError` otherwise, so a malformed or unknown
message changes nothing.

    source -> destination: negotiate, final, go, abort
    destination -> source: prepared, refused, ready, resumed
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from xmig import errors
from xmig.errors import ProtocolError


@dataclass(frozen=True)
class Message:
    type: ClassVar[str]

    def encode(self) -> bytes:
        return json.dumps({"type": self.type, **asdict(self)}, sort_keys=True).encode()


@dataclass(frozen=True)
class Negotiate(Message):
    """The VM's configuration; the destination prepares an empty, paused VM and disk."""

    type: ClassVar[str] = "negotiate"
    migration: str
    epoch: int
    guest: dict[str, Any]  #: backend name and its configuration (sizes, workload, …)
    disk_bytes: int
    ram_bytes: int


@dataclass(frozen=True)
class Prepared(Message):
    type: ClassVar[str] = "prepared"
    migration: str


@dataclass(frozen=True)
class Refused(Message):
    """The destination cannot take the VM (disk too small, cannot start the guest, …)."""

    type: ClassVar[str] = "refused"
    migration: str
    error: str  #: the typed error's class name
    reason: str

    def as_error(self) -> errors.XmigError:
        """The typed error the destination named (MigrationError for a name xmig does not
        know, or one that is not a refusal: nothing else is instantiated from the wire)."""
        cls = getattr(errors, self.error, None)
        if not (isinstance(cls, type) and issubclass(cls, errors.XmigError)) or (
                cls in _NOT_REFUSALS):
            cls = errors.MigrationError
        return cls(f"destination refused: {self.reason}")


#: errors whose constructors want more than a message, or that only a source raises
_NOT_REFUSALS = (errors.StaleEpochError, errors.InDoubt, errors.SequenceError,
                 errors.OversizedFrameError)


@dataclass(frozen=True)
class Final(Message):
    """Everything is sent: last pages, mirror writes up to ``disk_seq`` (the destination
    applies them before READY), device state."""

    type: ClassVar[str] = "final"
    migration: str
    epoch: int
    disk_seq: int
    device_state_bytes: int


@dataclass(frozen=True)
class Ready(Message):
    """All applied and fsynced, READY journaled; the destination guest waits for GO."""

    type: ClassVar[str] = "ready"
    migration: str
    epoch: int
    digests: dict[str, str] = field(default_factory=dict)  #: memory, device, disk


@dataclass(frozen=True)
class Go(Message):
    type: ClassVar[str] = "go"
    migration: str
    epoch: int


@dataclass(frozen=True)
class Abort(Message):
    type: ClassVar[str] = "abort"
    migration: str
    epoch: int
    reason: str


@dataclass(frozen=True)
class Resumed(Message):
    """The destination guest runs (``at``: its first progress timestamp, monotonic clock)."""

    type: ClassVar[str] = "resumed"
    migration: str
    epoch: int
    at: float


MESSAGES: dict[str, type[Message]] = {
    m.type: m for m in (Negotiate, Prepared, Refused, Final, Ready, Go, Abort, Resumed)
}


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "int": int, "str": str, "float": (int, float), "dict[str, Any]": dict, "dict[str, str]": dict,
}


def decode(data: bytes | bytearray) -> Message:
    """Parse one control message; ProtocolError if it is not one."""
    try:
        body = json.loads(data)
        kind = body.pop("type")
        cls = MESSAGES[kind]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ProtocolError(f"malformed control message: {err!r}") from err
    names = set(cls.__dataclass_fields__)
    if set(body) - names:
        raise ProtocolError(f"{kind}: unknown fields {sorted(set(body) - names)}")
    try:
        msg = cls(**body)
    except TypeError as err:
        raise ProtocolError(f"{kind}: {err}") from err
    for name, f in cls.__dataclass_fields__.items():
        want = _FIELD_TYPES.get(str(f.type))
        if want is not None and not isinstance(getattr(msg, name), want):
            raise ProtocolError(f"{kind}.{name} has the wrong type")
    return msg
