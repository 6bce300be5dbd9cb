"""The commit protocol, executed: a state machine's :class:`~xmig.protocol.switchover.Step` is
carried
out action by action, in the machine's order, for every backend.

The machines (:mod:`xmig.protocol.switchover`) decide *what* happens and in which order (GO is
journaled before it is sent; RUNNING before the destination guest resumes; ABORT journaled
before the source guest resumes and the destination is told). A backend says only *how* each
action is done on its side, as :class:`Effects`; :func:`execute` does them in the step's
order, so that order is written and tested once (``tests/test_commit.py``), not by hand in
each orchestrator. A step that needs an effect the backend did not give fails before
anything is done.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from xmig.errors import StateError
from xmig.protocol.switchover import Action, Step

Effect = Callable[[], Awaitable[None]]


async def nothing() -> None:
    """The effect of an action that has nothing to do on this backend's side."""


@dataclass(frozen=True)
class Effects:
    """How one side of one backend performs each action (None: it cannot).

    ``journal(kind)`` appends and fsyncs the step's record (GO, ABORT, READY, RUNNING,
    DISCARDED, ABANDONED) with whatever this backend keeps with it; it returns only once
    the record is durable."""

    journal: Callable[[str], object] | None = None
    pause_guest: Effect | None = None
    resume_guest: Effect | None = None
    release_throttle: Effect | None = None
    stop_mirror: Effect | None = None
    stop_transfer: Effect | None = None
    send_ready: Effect | None = None
    send_go: Effect | None = None
    send_abort: Effect | None = None
    discard: Effect | None = None
    discard_source: Effect | None = None

    def effect(self, action: Action) -> Effect | None:
        found: Effect | None = getattr(self, action.value)
        return found

    def lacks(self, step: Step) -> list[str]:
        """The actions of ``step`` this side cannot do."""
        return [a.value for a in step.actions if (
            self.journal is None or not step.journal if a is Action.JOURNAL
            else self.effect(a) is None)]


async def execute(step: Step, effects: Effects) -> Step:
    """Perform ``step``'s actions in order; returns the step. StateError, before anything
    is done, if ``effects`` lacks one of them. An effect that fails stops the rest (its
    error propagates): nothing after a journal record that could not be written is done."""
    missing = effects.lacks(step)
    if missing:
        raise StateError(f"no effect for {', '.join(missing)} in phase {step.phase.value}",
                         state=str(step.phase.value), event=",".join(missing))
    for action in step.actions:
        if action is Action.JOURNAL:
            assert effects.journal is not None and step.journal is not None
            effects.journal(step.journal)
            continue
        effect = effects.effect(action)
        assert effect is not None
        await effect()
    return step
