"""The phases of a migration and the commit protocol, as two state machines. Sans-IO.

The source agent coordinates. Each side feeds events in and reads the actions to perform;
the orchestrator does the I/O (the transport, the guest, the journal), each step's actions
in their order through :func:`xmig.protocol.commit.execute`. Transitions are the
tables :data:`SOURCE_TRANSITIONS` and :data:`DEST_TRANSITIONS`; an event a state does not
allow raises :class:`~xmig.errors.StateError`; a failure moves to the sticky FAILED state.

Source::

    NEGOTIATE -> BROWNOUT -> BLACKOUT -> PREPARE --ready: GO journaled--> COMMITTED
        \\___________\\___________\\__________\\--abort--> ABORTED     |        |
                                                       ^             cut_off  resumed
                                                   abandoned          v        v
                                                       \\-------- IN_DOUBT --> DONE

Destination::

    NEGOTIATE -> RECEIVING -> READY (journaled, paused) --GO--> RUNNING
        \\____________\\__________\\--abort--> DISCARDED       |    ^
                                            ^            cut_off  GO
                                          abort           v     /
                                            \\-------- IN_DOUBT --abandon--> ABANDONED
                                                   (restored from the journal after a restart)

The invariants (DESIGN.md, I1): the source writes GO to its journal *before* sending it and
never resumes its guest afterwards, unless the destination answers that it *abandoned* that
epoch (journaled there first, and GO for it refused for ever: a destination restarted
without its paused guest); the source keeps its paused copy until the destination confirms
it runs the guest (RESUMED) or abandoned it, however long that takes (IN_DOUBT). The
destination resumes only on GO; before GO, abort resumes the source. A destination READY
without GO stays paused (IN_DOUBT) until it hears the decision, or an operator forces a side
(disaster recovery). A destination never decides alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Generic, TypeVar

from xmig.errors import StateError


class SourcePhase(enum.Enum):
    NEGOTIATE = "negotiate"  #: authenticate, exchange the VM's configuration
    BROWNOUT = "brownout"  #: bulk copy, pre-copy rounds, mirror; the guest runs
    BLACKOUT = "blackout"  #: guest paused; last pages, mirror drain, device state
    PREPARE = "prepare"  #: all sent; waiting for the destination's READY
    COMMITTED = "committed"  #: GO journaled (and sent): the source never resumes
    IN_DOUBT = "in-doubt"  #: GO journaled, no word from the destination: the copy is kept
    DONE = "done"  #: the destination runs; the source guest is discarded
    ABORTED = "aborted"  #: the source guest runs as if nothing happened
    FAILED = "failed"  #: sticky; see ``error``


class DestPhase(enum.Enum):
    NEGOTIATE = "negotiate"
    RECEIVING = "receiving"
    READY = "ready"  #: everything applied and fsynced, READY journaled; guest paused
    IN_DOUBT = "in-doubt"  #: READY and cut off from the source: paused until it decides
    RUNNING = "running"  #: GO received (and journaled): the guest runs here
    DISCARDED = "discarded"  #: aborted: what was received is thrown away
    ABANDONED = "abandoned"  #: restarted without the paused guest: this epoch never runs here
    FAILED = "failed"


Src, Dst = SourcePhase, DestPhase

SOURCE_TRANSITIONS: dict[tuple[SourcePhase, str], SourcePhase] = {
    (Src.NEGOTIATE, "negotiated"): Src.BROWNOUT,
    (Src.BROWNOUT, "pause"): Src.BLACKOUT,
    (Src.BLACKOUT, "final_sent"): Src.PREPARE,
    (Src.PREPARE, "ready"): Src.COMMITTED,
    (Src.COMMITTED, "resumed"): Src.DONE,
    (Src.COMMITTED, "cut_off"): Src.IN_DOUBT,
    (Src.IN_DOUBT, "resumed"): Src.DONE,
    (Src.COMMITTED, "abandoned"): Src.ABORTED,
    (Src.IN_DOUBT, "abandoned"): Src.ABORTED,
    (Src.NEGOTIATE, "abort"): Src.ABORTED,
    (Src.BROWNOUT, "abort"): Src.ABORTED,
    (Src.BLACKOUT, "abort"): Src.ABORTED,
    (Src.PREPARE, "abort"): Src.ABORTED,
}

DEST_TRANSITIONS: dict[tuple[DestPhase, str], DestPhase] = {
    (Dst.NEGOTIATE, "prepared"): Dst.RECEIVING,
    (Dst.RECEIVING, "final_applied"): Dst.READY,
    (Dst.READY, "go"): Dst.RUNNING,
    (Dst.READY, "cut_off"): Dst.IN_DOUBT,
    (Dst.IN_DOUBT, "go"): Dst.RUNNING,
    (Dst.IN_DOUBT, "abandon"): Dst.ABANDONED,
    (Dst.NEGOTIATE, "abort"): Dst.DISCARDED,
    (Dst.RECEIVING, "abort"): Dst.DISCARDED,
    (Dst.READY, "abort"): Dst.DISCARDED,
    (Dst.IN_DOUBT, "abort"): Dst.DISCARDED,
}


class Action(enum.Enum):
    """What the orchestrator must do after an event, in this order."""

    PAUSE_GUEST = "pause_guest"
    RESUME_GUEST = "resume_guest"  #: source: after abort; destination: after GO
    RELEASE_THROTTLE = "release_throttle"
    STOP_MIRROR = "stop_mirror"
    STOP_TRANSFER = "stop_transfer"  #: source: end the memory transfer (QEMU: its migration)
    JOURNAL = "journal"  #: write the decision (fsync) before anything that follows
    SEND_READY = "send_ready"
    SEND_GO = "send_go"
    SEND_ABORT = "send_abort"
    DISCARD = "discard"  #: destination: throw away what was received
    DISCARD_SOURCE = "discard_source"  #: source: the guest moved; drop it


@dataclass(frozen=True)
class Step:
    """The new phase and the ordered actions that go with it."""

    phase: SourcePhase | DestPhase
    actions: tuple[Action, ...]
    journal: str | None = None  #: the record's kind, when JOURNAL is among the actions


P = TypeVar("P", SourcePhase, DestPhase)


class _Machine(Generic[P]):
    def __init__(self, start: P, epoch: int, table: dict[tuple[P, str], P], failed: P) -> None:
        self.table: dict[tuple[P, str], P] = table
        self.failed: P = failed
        self.phase: P = start
        self.epoch = epoch
        self.error: str | None = None
        self.history: list[tuple[str, str]] = []

    def _go(self, event: str) -> P:
        if self.phase is self.failed:
            raise StateError(f"migration failed earlier: {self.error}", state="failed",
                             event=event)
        try:
            new = self.table[(self.phase, event)]
        except KeyError:
            raise StateError(
                f"{event!r} is not allowed in phase {self.phase.value}",
                state=str(self.phase.value), event=event,
            ) from None
        self.history.append((event, str(new.value)))
        self.phase = new
        return new

    def _restore(self, phase: P) -> None:
        """Start in ``phase``, read back from a journal rather than reached here."""
        self.phase = phase
        self.history.append(("restored", str(phase.value)))

    def fail(self, why: str) -> None:
        """Something the protocol cannot recover from; the phase becomes FAILED for good."""
        if self.phase is not self.failed:
            self.error = why
            self.history.append(("fail", why))
            self.phase = self.failed


class SourceMachine(_Machine[SourcePhase]):
    """The coordinator's side."""

    def __init__(self, epoch: int) -> None:
        super().__init__(Src.NEGOTIATE, epoch, SOURCE_TRANSITIONS, Src.FAILED)

    def negotiated(self) -> Step:
        return Step(self._go("negotiated"), ())

    def pause(self) -> Step:
        """Switch over: predicted downtime fits the budget."""
        return Step(self._go("pause"), (Action.RELEASE_THROTTLE, Action.PAUSE_GUEST))

    def final_sent(self) -> Step:
        return Step(self._go("final_sent"), ())

    def ready(self, epoch: int) -> Step:
        """The destination applied everything: journal GO, then send it. From here on the
        source guest is never resumed, whatever fails."""
        if epoch != self.epoch:
            raise StateError(f"READY for epoch {epoch}, this migration is {self.epoch}",
                             state=str(self.phase.value), event="ready")
        return Step(self._go("ready"), (Action.JOURNAL, Action.SEND_GO),
                    journal="GO")

    def resumed(self) -> Step:
        """The destination confirmed it runs the guest."""
        return Step(self._go("resumed"), (Action.DISCARD_SOURCE,))

    @classmethod
    def in_doubt(cls, epoch: int) -> SourceMachine:
        """The machine of a migration whose journal holds GO and no confirmation."""
        machine = cls(epoch)
        machine._restore(Src.IN_DOUBT)
        return machine

    def cut_off(self) -> Step:
        """GO sent, no confirmation: keep the paused copy and tell the destination again
        until it answers (RESUMED, or that it abandoned the epoch)."""
        return Step(self._go("cut_off"), ())

    def abandoned(self, epoch: int) -> Step:
        """The destination journaled that this epoch never runs there (restarted without
        its paused copy): the source's copy is the only one; it resumes."""
        if epoch != self.epoch:
            raise StateError(f"abandoned epoch {epoch}, this migration is {self.epoch}",
                             state=str(self.phase.value), event="abandoned")
        return Step(self._go("abandoned"), (Action.JOURNAL, Action.RESUME_GUEST),
                    journal="ABANDONED")

    def abort(self, why: str) -> Step:
        """Before GO only: release everything and keep (or make) the source guest running."""
        paused = self.phase in (Src.BLACKOUT, Src.PREPARE)
        step = self._go("abort")
        self.error = why
        actions = [Action.JOURNAL, Action.RELEASE_THROTTLE, Action.STOP_MIRROR,
                   Action.STOP_TRANSFER]
        if paused:
            actions.append(Action.RESUME_GUEST)
        actions.append(Action.SEND_ABORT)
        return Step(step, tuple(actions), journal="ABORT")

    @property
    def may_resume_source(self) -> bool:
        """Whether the source guest may run again (I1): never once GO is journaled."""
        return self.phase not in (Src.COMMITTED, Src.IN_DOUBT, Src.DONE)


class DestMachine(_Machine[DestPhase]):
    """The destination's side."""

    def __init__(self, epoch: int) -> None:
        super().__init__(Dst.NEGOTIATE, epoch, DEST_TRANSITIONS, Dst.FAILED)

    def prepared(self) -> Step:
        return Step(self._go("prepared"), ())

    def final_applied(self) -> Step:
        """Every page, write and the device state applied and fsynced: vote READY."""
        return Step(self._go("final_applied"), (Action.JOURNAL, Action.SEND_READY),
                    journal="READY")

    def go(self, epoch: int) -> Step:
        if epoch != self.epoch:
            raise StateError(f"GO for epoch {epoch}, this migration is {self.epoch}",
                             state=str(self.phase.value), event="go")
        return Step(self._go("go"), (Action.JOURNAL, Action.RESUME_GUEST),
                    journal="RUNNING")

    def cut_off(self) -> Step:
        """READY, then the source is gone: it may have journaled GO. Stay paused."""
        return Step(self._go("cut_off"), ())

    def abandon(self) -> Step:
        """In doubt after a restart that lost the paused guest: journal that this epoch
        never runs here (GO for it is refused for ever), then the source may resume."""
        return Step(self._go("abandon"), (Action.JOURNAL, Action.DISCARD),
                    journal="ABANDONED")

    @classmethod
    def in_doubt(cls, epoch: int) -> DestMachine:
        """The machine of a migration its journal left READY (after a restart)."""
        machine = cls(epoch)
        machine._restore(Dst.IN_DOUBT)
        return machine

    def abort(self, why: str) -> Step:
        if self.phase is Dst.RUNNING:
            raise StateError("the guest already runs here; abort is too late",
                             state="running", event="abort")
        step = self._go("abort")
        self.error = why
        return Step(step, (Action.JOURNAL, Action.DISCARD), journal="DISCARDED")

    def accepts_write(self, epoch: int) -> bool:
        """Fencing (I3): writes of an older epoch are refused."""
        return epoch >= self.epoch and self.phase in (Dst.NEGOTIATE, Dst.RECEIVING)
