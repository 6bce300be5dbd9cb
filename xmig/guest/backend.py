"""The interface a guest backend implements for the one source engine
(:func:`xmig.orchestrator.source.run_source`), and the result every backend's source fills.

The engine owns the protocol: NEGOTIATE and its answer, the peer's word read alongside the
transfer (an ABORT or a broken session ends pre-copy at once), the blackout's deadline,
FINAL, READY, the commit (GO journaled, then sent: :mod:`xmig.protocol.commit`), the wait for
RESUMED and, before GO, the abort. A backend says how its guest is moved:

    negotiate()        what the destination is told of the guest
    start(session)     after PREPARED: the disk mirror and the memory transfer begin
    converge()         the brownout: returns once the guest may pause (or its hypervisor
                       paused it: QEMU's pre-switchover)
    watch()            runs beside the brownout; raises when a part of the transfer breaks
    pause_effects()    the pause step's effects (release the throttle, pause the guest)
    seal()             paused: the last state queued; FINAL's figures
    after_final()      FINAL is sent (QEMU: migrate-continue)
    transferred(peer)  the last bytes are out (``peer``: the destination's next word)
    check_ready(ready) READY is the destination's vote: compare what it says; the fields
                       journaled with GO (GoRecord)
    after_go()         GO is sent: the source's copy stays paused, its mirror ends
    finish()           RESUMED came: the source's figures, its transfer closed
    interrupted()      any failure: background work stopped (before abort or in doubt)
    abort_effects(...) the abort step's effects, the source guest running at the end

A destination backend (:class:`DestBackend`) is driven the same way by
:func:`xmig.orchestrator.destination.run_destination`: prepare, receive until FINAL, vote
(READY's digests), before GO, resume, hold in doubt, discard.

Backends never import the engine; they import this module and the protocol
(:mod:`xmig.protocol.control`).
"""

from __future__ import annotations

import asyncio
import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol

from xmig.events import Event
from xmig.protocol import control
from xmig.protocol.commit import Effects
from xmig.protocol.switchover import DestMachine
from xmig.transport import TransportSession


class Outcome(enum.StrEnum):
    """How a migration ended for its source (a ``str``: reports print it as is)."""

    RUNNING = "running"  #: not ended yet
    DONE = "done"  #: the destination confirmed that the guest runs there
    ABORTED = "aborted"  #: before GO: the source guest runs on
    IN_DOUBT = "in-doubt"  #: GO journaled, unconfirmed: settle it (xmig resolve)


class Arrival(enum.StrEnum):
    """Where a migration stands for its destination (a ``str``: reports print it as is)."""

    RECEIVING = "receiving"  #: not ended yet
    RUNNING = "running"  #: GO: the guest runs here
    DISCARDED = "discarded"  #: aborted: nothing of it is left here
    IN_DOUBT = "in-doubt"  #: READY, cut off from the source: paused until its decision


class Emit(Protocol):
    """Report an event (the engine stamps its phase and time)."""

    def __call__(self, event: Event, /) -> None: ...


@dataclass
class SourceResult:
    """What a source saw; every backend's result extends it with its own figures."""

    migration: str
    epoch: int
    status: Outcome = Outcome.RUNNING
    error: str | None = None
    started: float = 0.0
    paused_at: float = 0.0  #: the guest's vCPUs stopped here (monotonic)
    committed_at: float = 0.0  #: GO sent
    resumed_at: float = 0.0  #: the destination's RESUMED (its monotonic clock)
    resumed_seen_at: float = 0.0  #: when RESUMED arrived here
    sdps_max_throttle: float = 0.0
    timeline: list[Event] = field(default_factory=list)  #: every event, stamped


@dataclass(frozen=True)
class Sealed:
    """The paused source's last state is queued: what FINAL says of it."""

    disk_seq: int = 0  #: the last mirrored write
    device_state_bytes: int = 0  #: sent on the device-state channel before FINAL


@dataclass(frozen=True)
class GoRecord:
    """What is journaled with GO besides the decision (settling sends it again)."""

    fields: dict[str, Any] = field(default_factory=dict)


class SourceBackend(ABC):
    """One guest on the source side of one migration, driven by the engine."""

    #: the result the engine fills (the backend's own figures are set by its hooks)
    result: SourceResult

    @abstractmethod
    def negotiate(self, migration: str, epoch: int, token: str) -> control.Negotiate:
        """What the destination is told: the guest's definition, none of this host's paths."""

    @abstractmethod
    async def start(self, session: TransportSession, emit: Emit) -> None:
        """After PREPARED: begin the disk mirror and the memory transfer."""

    @abstractmethod
    async def converge(self) -> None:
        """The brownout: return when the guest may be paused (NotConverging past the
        backend's timeout)."""

    async def watch(self) -> None:
        """Beside :meth:`converge`: raise when a part of the transfer breaks; never return
        otherwise. By default nothing is watched but the session (the engine does)."""
        await _forever()

    @abstractmethod
    def pause_effects(self) -> Effects:
        """The pause step's effects: ``release_throttle`` and ``pause_guest``."""

    @abstractmethod
    async def seal(self) -> Sealed:
        """The guest is paused: queue its last memory, seal the mirror, send the device
        state."""

    async def after_final(self) -> None:
        """FINAL is sent."""
        return None

    async def transferred(self, peer: Any) -> None:
        """Return when the source's last bytes are out; ``peer`` (an asyncio future) is the
        destination's next word, which may come first."""
        return None

    @abstractmethod
    async def check_ready(self, ready: control.Ready) -> GoRecord:
        """READY: compare the destination's account with the source's (MigrationError on a
        difference: GO is not sent); what goes into GO's journal record."""

    async def after_go(self) -> None:
        """GO is sent: the source's copy never runs again."""
        return None

    async def finish(self) -> None:
        """RESUMED arrived, or did not in time: figures taken, the transfer closed."""
        return None

    async def interrupted(self) -> None:
        """A failure, before the abort or when left in doubt: background work stopped."""
        return None

    @abstractmethod
    def abort_effects(self) -> Effects:
        """The abort step's effects but the journal and ABORT: ``release_throttle``,
        ``stop_mirror``, ``stop_transfer``, ``resume_guest`` (the guest runs at the end)."""


async def _forever() -> None:
    await asyncio.Event().wait()


@dataclass
class DestResult:
    """What a destination saw; every backend's result extends it with its own parts."""

    migration: str = ""
    epoch: int = 0
    status: Arrival = Arrival.RECEIVING
    error: str | None = None
    resumed_at: float = 0.0  #: the guest runs here since (monotonic)
    token: str = field(default="", repr=False)  #: the migration's secret (Negotiate's)
    owner: str = ""  #: the identity (certificate) of the source that started it
    machine: DestMachine | None = None  #: kept while in doubt, to settle it


class DestBackend(ABC):
    """One guest on the destination side of one migration, driven by the engine
    (:func:`xmig.orchestrator.destination.run_destination`)."""

    result: DestResult

    @abstractmethod
    async def prepare(self, session: TransportSession, negotiate: control.Negotiate) -> None:
        """Check the request against this host (typed errors: the source is REFUSED), then
        make the paused guest and everything it receives into; PREPARED is said next."""

    @abstractmethod
    async def receive(self, final: Any) -> control.Final:
        """Apply what arrives until the source's FINAL (``final``, an asyncio future of the
        source's next word) and everything up to it is applied and durable."""

    @abstractmethod
    async def vote(self, decision: Any) -> dict[str, str]:
        """Check what arrived (``decision``: the source's next word, GO or ABORT, which may
        end the check); READY's digests."""

    async def before_go(self, session: TransportSession | None) -> None:
        """GO arrived on ``session`` (None: an operator forced it): what must be in place
        before the guest runs (still paused)."""
        return None

    def check_force(self, force: str) -> None:
        """An operator would force ``force`` ("go", "abort") with the source gone:
        GuestStateError if this guest cannot take it (nothing is changed)."""
        return None

    @abstractmethod
    def go_effects(self) -> Effects:
        """The GO step's effect: ``resume_guest``."""

    async def after_resume(self) -> None:
        """The guest runs here: what carried it closed."""
        return None

    async def hold(self) -> None:
        """READY and cut off from the source: keep the paused guest and its image."""
        return None

    @abstractmethod
    async def discard(self) -> None:
        """Throw away everything made for this migration."""
