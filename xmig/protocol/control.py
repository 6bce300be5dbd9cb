"""The control messages between a source and a destination agent (CONTROL channel). Sans-IO.

One JSON object per message, tagged by ``type``. :func:`decode` is the trust boundary: it
parses the bytes straight into typed, validated values (msgspec) or raises
:class:`~xmig.errors.ProtocolError`, so a malformed, unknown, oversized, deeply nested or
out-of-range message changes nothing. Ids match a strict pattern, sizes are bounded, enums
are enums, strings and maps have a maximum length, and no field holds arbitrary JSON.

What a source says is a *label*, never a path: the guest's description carries sizes and
the workload, not where the destination keeps its files, its nice level or its addresses
(the destination chooses those from its own configuration).

    source -> destination: negotiate, final, go, abort
    destination -> source: prepared, refused, ready, resumed

A session may instead open with ``probe`` (``xmig migrate --plan``): the source measures the
link with filler on the bulk channel for at most :data:`MAX_PROBE_S`, the destination
consumes and drops it and answers ``probed`` with what it received. Nothing is prepared or
kept, and it is not a migration (an ``agent --once`` still takes one after it).
"""

from __future__ import annotations

import hmac
import secrets
from typing import Annotated, Literal

import msgspec

from xmig import errors
from xmig.errors import ProtocolError
from xmig.protocol import strictjson

GiB = 1 << 30
MAX_MESSAGE_BYTES = 4 << 20  #: the CONTROL channel's window: no message is larger
MAX_RAM_BYTES = 1 << 44  #: 16 TiB: more than any host has, less than makes arithmetic odd
MAX_DISK_BYTES = 1 << 50  #: 1 PiB
MAX_DEVICE_STATE_BYTES = 1 << 28
MAX_TEXT = 4096
MAX_PROBE_S = 10.0  #: the longest a source may measure the link (``probe``)

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: a migration id or guest name: a label (letters, digits, ``_.-``; 1–64), never a path
Label = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
Epoch = Annotated[int, msgspec.Meta(ge=0, le=2**62)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
RamBytes = Annotated[int, msgspec.Meta(ge=0, le=MAX_RAM_BYTES)]
DiskBytes = Annotated[int, msgspec.Meta(ge=0, le=MAX_DISK_BYTES)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
Rate = Annotated[float, msgspec.Meta(ge=0, le=1e13)]
Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]
ErrorName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z][A-Za-z0-9]{0,63}$")]
DigestKey = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
DigestValue = Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE_BYTES)]
#: the migration's secret: 128 random bits in hex, made by the source, journaled with START;
#: a decision (GO, ABORT) is honoured only with it ("": none, never honoured)
Token = Annotated[str, msgspec.Meta(pattern=r"^([0-9a-f]{32})?$")]
#: a kernel command line: printable ASCII, no control characters
CommandLine = Annotated[str, msgspec.Meta(pattern=r"^[\x20-\x7e]*$", max_length=MAX_TEXT)]


class _Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


# ---- what a source says of its guest -----------------------------------------------------


class SimSpec(_Strict, frozen=True):
    """The reference guest's definition: sizes, workload, rates. Not its files, nice level or
    addresses: the destination picks those."""

    ram_bytes: RamBytes
    disk_bytes: DiskBytes = 0
    workload: Literal["idle", "uniform", "hotset", "scan", "oltp"] = "idle"
    rate_Bps: Rate | None = None  #: page-write rate; None: as fast as it can
    hotset_bytes: RamBytes = 16 << 20
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0
    zero_fraction: Fraction = 0.4
    text_fraction: Fraction = 0.3
    write_size: Annotated[int, msgspec.Meta(ge=8, le=4096)] = 256
    disk_rate_Bps: Rate | None = 0.0  #: None: as fast as it can
    table_bytes: RamBytes = 4 << 20
    oltp_keys: Annotated[int, msgspec.Meta(ge=0, le=1 << 32)] = 4096
    disk_queue_depth: Annotated[int, msgspec.Meta(ge=0, le=1024)] = 32
    udp: bool = False  #: it serves its UDP key-value service (on an address the host picks)


class QemuSpec(_Strict, frozen=True):
    """A QEMU guest's definition: RAM, vCPUs, kernel command line, name."""

    ram_mb: Annotated[int, msgspec.Meta(ge=1, le=MAX_RAM_BYTES >> 20)]
    smp: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 1
    append: CommandLine = ""
    name: Label = "guest"


class GuestSpec(_Strict, tag_field="backend", frozen=True):
    """Which backend, and its guest's definition."""

    @property
    def backend(self) -> str:
        return str(self.__struct_config__.tag)


class SimGuest(GuestSpec, tag="sim", frozen=True):
    config: SimSpec
    verify: bool = True  #: both sides digest memory, device state and disk


class QemuGuest(GuestSpec, tag="qemu", frozen=True):
    config: QemuSpec


# ---- the messages -------------------------------------------------------------------------


class Message(_Strict, tag_field="type", frozen=True):
    """One control message."""

    @property
    def type(self) -> str:
        return str(self.__struct_config__.tag)

    def encode(self) -> bytes:
        return msgspec.json.encode(self)


class Negotiate(Message, tag="negotiate", frozen=True):
    """The VM's configuration; the destination prepares an empty, paused VM and disk."""

    migration: Label
    epoch: Epoch
    guest: SimGuest | QemuGuest
    disk_bytes: DiskBytes
    ram_bytes: RamBytes
    token: Token = ""


class Probe(Message, tag="probe", frozen=True):
    """A source measuring the link before it migrates: ``seconds`` of filler follow on the
    bulk channel, then ``probe-end`` on this one."""

    seconds: Annotated[float, msgspec.Meta(gt=0, le=MAX_PROBE_S)]


class ProbeEnd(Message, tag="probe-end", frozen=True):
    sent_bytes: Annotated[int, msgspec.Meta(ge=0, le=2**62)]


class Probed(Message, tag="probed", frozen=True):
    """The destination's answer: the filler bytes it received (and dropped)."""

    received_bytes: Annotated[int, msgspec.Meta(ge=0, le=2**62)]


class Prepared(Message, tag="prepared", frozen=True):
    migration: Label


class Refused(Message, tag="refused", frozen=True):
    """The destination cannot take the VM (disk too small, over its limits, a malformed
    message, …). ``migration`` is empty when the refused message named none we could read."""

    migration: Annotated[str, msgspec.Meta(pattern=r"^$|" + ID_PATTERN)]
    error: ErrorName  #: the typed error's class name
    reason: Text

    @classmethod
    def of(cls, migration: str, err: BaseException) -> Refused:
        """The refusal telling a source why: a typed error by its class (the source raises
        that class again, :meth:`as_error`), anything else as MigrationError with its class
        in the reason."""
        if isinstance(err, errors.XmigError):
            return cls(migration, type(err).__name__, str(err)[:MAX_TEXT])
        return cls(migration, "MigrationError", error_text(err))

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


class Final(Message, tag="final", frozen=True):
    """Everything is sent: last pages, mirror writes up to ``disk_seq`` (the destination
    applies them before READY), device state."""

    migration: Label
    epoch: Epoch
    disk_seq: Seq
    device_state_bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_DEVICE_STATE_BYTES)]


class Ready(Message, tag="ready", frozen=True):
    """All applied and fsynced, READY journaled; the destination guest waits for GO."""

    migration: Label
    epoch: Epoch
    #: memory, device, disk (QEMU: stream_bytes, ram_stale)
    digests: Annotated[dict[DigestKey, DigestValue], msgspec.Meta(max_length=16)] = {}


class Go(Message, tag="go", frozen=True):
    migration: Label
    epoch: Epoch
    token: Token = ""


class Abort(Message, tag="abort", frozen=True):
    migration: Label
    epoch: Epoch
    reason: Text
    token: Token = ""


class Resumed(Message, tag="resumed", frozen=True):
    """The destination guest runs (``at``: its first progress timestamp, monotonic clock)."""

    migration: Label
    epoch: Epoch
    at: Annotated[float, msgspec.Meta(ge=0)]


class Discarded(Message, tag="discarded", frozen=True):
    """The destination's answer to an ABORT on a session that settles a migration: its copy
    of ``epoch`` is discarded (now, or before) and never runs there."""

    migration: Label
    epoch: Epoch


def error_text(err: BaseException) -> str:
    """An error as a peer is told it (an ABORT's or a refusal's reason): class and message,
    bounded."""
    return f"{type(err).__name__}: {err}"[:MAX_TEXT]


def new_token() -> str:
    """A fresh migration token (the source makes one per migration)."""
    return secrets.token_hex(16)


def token_matches(given: str, expected: str) -> bool:
    """Whether a decision carries the migration's token (constant time; "" never does)."""
    return bool(expected) and hmac.compare_digest(given, expected)


def check_decision(decision: Go | Abort, migration: str, epoch: int, token: str) -> None:
    """ProtocolError unless ``decision`` is for this migration and epoch, with its token."""
    if (decision.migration != migration or decision.epoch != epoch
            or not token_matches(decision.token, token)):
        raise ProtocolError(f"a {decision.type} for migration {decision.migration} epoch "
                            f"{decision.epoch} without this migration's token: ignored")


def unexpected(msg: Message, wanted: str, *, peer: str) -> errors.XmigError:
    """The typed error for ``msg`` from ``peer`` ("source", "destination") where ``wanted``
    was awaited: its ABORT is a MigrationError, its REFUSED the error it names, anything
    else a ProtocolError."""
    if isinstance(msg, Abort):
        return errors.MigrationError(f"{peer} aborted: {msg.reason}")
    if isinstance(msg, Refused):
        return msg.as_error()
    return ProtocolError(f"expected {wanted}, got {msg.type}")


MESSAGES: dict[str, type[Message]] = {
    m.__struct_config__.tag: m  # type: ignore[misc]
    for m in (Negotiate, Prepared, Refused, Final, Ready, Go, Abort, Resumed, Discarded,
              Probe, ProbeEnd, Probed)
}

AnyMessage = (Negotiate | Prepared | Refused | Final | Ready | Go | Abort | Resumed
              | Discarded | Probe | ProbeEnd | Probed)
_decoder: msgspec.json.Decoder[AnyMessage] = msgspec.json.Decoder(AnyMessage)


def decode(data: bytes | bytearray | memoryview) -> AnyMessage:
    """Parse and validate one control message; ProtocolError (saying what and where) if it
    is not one. Never raises anything else, whatever the bytes."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"control message of {len(data)} bytes exceeds "
                            f"{MAX_MESSAGE_BYTES}")
    return strictjson.decode(_decoder, data, "control message")


def migration_of(data: bytes | bytearray | memoryview) -> str:
    """The migration id a message names, if it names a valid one ("" otherwise): for a
    refusal answering a message that did not decode."""
    if len(data) > MAX_MESSAGE_BYTES:
        return ""
    try:
        named = msgspec.json.decode(data, type=_Named)
    except (msgspec.MsgspecError, RecursionError, MemoryError, UnicodeError):
        return ""
    return named.migration


class _Named(msgspec.Struct):
    migration: Label = ""
