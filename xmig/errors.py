"""The one error tree of xmig.

Every error xmig raises on purpose is an :class:`XmigError`. Errors keep their cause
(``raise X from err``) and carry the context an operator needs (which peer, which channel,
which sequence number). ``asyncio.CancelledError`` is never wrapped.

::

    XmigError
     ├── ConfigError                 bad flags, arguments or files given by the operator
     │    └── PkiError               a PKI file that cannot be used: which one, and why
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
     │    │    └── PeerNotAllowed    valid, but its identity matches no --allow pattern
     │    ├── PeerLimitExceeded      a peer over its limit of sessions or connections
     │    ├── ConnectionClosed       we closed it
     │    ├── ConnectionBroken       it broke (reset, timeout, EOF mid-frame)
     │    ├── PeerUnreachable        no connection could be made before the deadline
     │    └── SessionExpired         the peer stayed away past the resume deadline
     ├── NetemError                  the WAN emulator could not be built or driven
     │    └── NetemPermissionError   it needs root (network namespaces, TUN)
     ├── GuestError                  a guest backend failed or refused
     │    ├── GuestNotFound          no such guest (socket, process, file)
     │    ├── GuestStateError        the guest cannot do that now (not paused, already gone)
     │    └── QemuError              QEMU, its QMP or the test-guest build failed
     │         └── QemuCapabilityError  this QEMU lacks a command or capability xmig needs
     ├── StorageError
     │    ├── DiskNotFound           the disk image is missing
     │    ├── DiskFormatError        a disk format xmig cannot mirror (not raw or qcow2)
     │    ├── DiskTooSmall           the destination cannot hold the source disk (also a
     │    │                          ResourceLimit)
     │    ├── DiskFull               ENOSPC writing the destination
     │    ├── StaleEpochError        a write from an older migration epoch (fencing, I3)
     │    └── NbdProtocolError       an NBD peer broke the protocol
     └── MigrationError
          ├── NotConverging          the dirty set will not fit the downtime budget in time
          ├── MigrationAborted       aborted before GO; the source guest runs
          ├── ResourceLimit          the destination's limits (RAM, disk) cannot take it
          ├── InDoubt                the commit's outcome is not known here yet: READY and
          │                          cut off before GO (destination), or GO sent and not
          │                          confirmed (source); the paused copy is kept
          ├── EpochAbandoned         (destination) restarted without the paused guest of
          │                          an epoch it voted READY for: it never runs there
          └── DeadlineExceeded       a step had a deadline and passed it: an answer of the
                                     peer, or the blackout as a whole (also a TimeoutError)
"""

from __future__ import annotations


class XmigError(Exception):
    """Base of every error xmig raises on purpose."""


class ConfigError(XmigError):
    """Bad flags, arguments or input files."""


class PkiError(ConfigError):
    """A certificate, key or CRL that cannot be used (missing, unreadable, expired, not yet
    valid, for another name, not signed by the CA): the message names the file and why."""

    def __init__(self, message: str, *, path: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason


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


class PeerNotAllowed(AuthenticationError):
    """The peer's certificate is valid and signed by the CA, but its identity (subject or
    SAN) matches none of the agent's ``--allow`` patterns."""


class PeerLimitExceeded(TransportError):
    """A peer already holds as many sessions or connections as the agent allows one peer."""


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


class GuestError(XmigError):
    """A guest backend failed or refused."""


class GuestNotFound(GuestError):
    """No such guest: its control socket, process or memory file is missing."""


class GuestStateError(GuestError):
    """The guest cannot do that in its current state."""


class QemuError(GuestError):
    """QEMU failed: it would not start, exited, or refused a QMP command; or the test guest
    (kernel, initramfs) could not be built."""


class QemuCapabilityError(QemuError):
    """The QEMU at hand lacks a QMP command or migration capability xmig needs (too old, or
    built without it); nothing was changed."""


class MigrationError(XmigError):
    """The migration could not complete."""


class ResourceLimit(MigrationError):
    """The destination will not take the guest: its RAM or disk exceeds the agent's limits
    (``--max-ram``, ``--max-disk``; by default the host's free memory and the workdir's free
    space). Refused before anything is made."""


class StorageError(XmigError):
    """Disk copy, mirroring or applying failed."""


class DiskNotFound(StorageError):
    """The disk image does not exist or cannot be opened."""


class DiskFormatError(StorageError):
    """The disk's format is not one xmig migrates (raw or qcow2)."""


class DiskTooSmall(StorageError, ResourceLimit):
    """The destination image, or its filesystem, is smaller than the source disk (also a
    :class:`ResourceLimit`: see below)."""


class DiskFull(StorageError):
    """The destination ran out of space (ENOSPC)."""


class StaleEpochError(StorageError):
    """A write carrying an older migration epoch than the destination's: refused (I3)."""

    def __init__(self, message: str, *, epoch: int, current: int) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.current = current


class NbdProtocolError(StorageError):
    """An NBD peer sent something the protocol does not allow."""


class NotConverging(MigrationError):
    """The guest dirties memory faster than the link drains it, and the timeout passed
    (with SDPS off, or even at its maximum throttle). The source guest keeps running."""


class MigrationAborted(MigrationError):
    """The migration was aborted before GO; the source guest runs as before.
    ``abort_unconfirmed``: the destination may hold a paused copy (it may have voted READY)
    that has not heard ABORT: the source keeps telling it (:mod:`xmig.orchestrator.settling`)."""

    def __init__(self, message: str, *, abort_unconfirmed: bool = False) -> None:
        super().__init__(message)
        self.abort_unconfirmed = abort_unconfirmed


class InDoubt(MigrationError):
    """The commit's outcome is not known on this side yet. On a destination: it voted READY
    and lost the source before GO arrived; it keeps the guest paused and its image (I1: the
    source may have journaled GO) until the source's decision reaches it
    (:func:`xmig.orchestrator.destination.settle`) or an operator forces a side. On a
    source: GO is journaled
    and sent and the destination has not confirmed it runs the guest; the source keeps its
    paused copy and tells the destination again until it answers."""

    def __init__(self, message: str, *, migration: str = "", epoch: int = 0,
                 result: object = None, backend: object = None) -> None:
        super().__init__(message)
        self.migration = migration
        self.epoch = epoch
        #: the :class:`~xmig.guest.backend.DestResult` holding the paused guest
        self.result = result
        #: the :class:`~xmig.guest.backend.DestBackend` that holds it, to settle it with
        self.backend = backend


class EpochAbandoned(MigrationError):
    """A destination restarted without the paused guest it voted READY for (its memory was
    gone) journaled that this epoch never runs there and refuses GO for it for ever: the
    source's paused copy is the only one, and it resumes."""


class DeadlineExceeded(MigrationError, TimeoutError):
    """A step passed its deadline: the peer's answer did not come in time, or the blackout
    (the guest's pause to GO) outlasted its bound. Before GO the migration aborts and the
    source guest resumes."""
