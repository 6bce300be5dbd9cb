"""The source's engine: one migration of any guest backend, phase by phase.

    NEGOTIATE  -> the destination prepares a paused guest (NEGOTIATE, PREPARED)
    BROWNOUT   -> the backend's transfer converges; the destination's word is read
                  alongside (an ABORT or a broken session ends it at once)
    BLACKOUT   -> from the pause, bounded as a whole (``blackout_timeout_s``): the last
                  state sealed, FINAL, READY checked
    PREPARE    -> GO journaled, then sent (:mod:`xmig.protocol.commit`); the source's copy stays
                  paused until the destination says RESUMED

The phases and the commit rules are :mod:`xmig.protocol.switchover`'s, executed from the machine's
steps; the backend (:class:`~xmig.guest.backend.SourceBackend`) says how its guest is
moved. Before GO any failure aborts (:func:`_abort`): ABORT journaled, the backend's
transfer ended and its guest running, the destination told; then
:class:`~xmig.errors.MigrationAborted` is raised with the cause. After GO the source's
guest never runs again: a failure leaves the migration in doubt (the result says so) for
the caller to settle (:func:`send_decision`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

from xmig.errors import (
    DeadlineExceeded,
    ProtocolError,
    TransportError,
    XmigError,
)
from xmig.events import BlackoutStep, Event, PhaseChanged
from xmig.guest.backend import Emit, Outcome, SourceBackend, SourceResult
from xmig.orchestrator.aborting import blackout_deadline, run_abort, tell_abort
from xmig.protocol import control
from xmig.protocol.commit import Effects, execute
from xmig.protocol.journal import Journal
from xmig.protocol.switchover import SourceMachine, SourcePhase
from xmig.transport import Channel, TransportSession

Progress = Callable[[Event], None]


async def recv_control(session: TransportSession, timeout: float | None) -> control.Message:
    """The peer's next control message; DeadlineExceeded past ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            return control.decode(await session.recv(Channel.CONTROL))
    except TimeoutError as err:
        raise DeadlineExceeded(f"no word from the destination within {timeout:g} s") from err


async def run_source(
    session: TransportSession,
    backend: SourceBackend,
    *,
    migration: str,
    journal: Journal,
    reply_timeout_s: float = 60.0,
    blackout_timeout_s: float = 10.0,
    on_progress: Progress = lambda event: None,
) -> SourceResult:
    """Move ``backend``'s guest to the destination agent at the other end of ``session``.
    Returns once the destination runs it (DONE) or GO is journaled and unconfirmed
    (IN_DOUBT); raises MigrationAborted (the source guest runs) on a failure before GO."""
    epoch = journal.next_epoch()
    machine = SourceMachine(epoch)
    result = backend.result
    result.migration, result.epoch, result.started = migration, epoch, time.monotonic()
    token = control.new_token()
    journal.append("START", migration, epoch, token=token)

    def emit(event: Event, /) -> None:
        stamped = dataclasses.replace(event, phase=machine.phase.value,
                                      t=round(time.monotonic() - result.started, 4))
        result.timeline.append(stamped)
        on_progress(stamped)

    peer: asyncio.Future[control.Message] | None = None
    try:
        await session.send(Channel.CONTROL, backend.negotiate(migration, epoch, token).encode())
        reply = await recv_control(session, reply_timeout_s)
        if not isinstance(reply, control.Prepared):
            raise control.unexpected(reply, "prepared", peer="destination")
        machine.negotiated()
        emit(PhaseChanged())
        await backend.start(session, emit)
        # the destination's next word is READY: anything before it ends the migration
        peer = asyncio.ensure_future(recv_control(session, None))
        async with blackout_deadline(
                blackout_timeout_s, armed=False,
                where=lambda: f"phase {machine.phase.value}: aborted, the source guest "
                "runs on") as arm_blackout:
            await _brownout(backend, peer)
            arm_blackout()
            ready = await _blackout(session, backend, machine, peer, emit,
                                    reply_timeout_s=reply_timeout_s)
            record = await backend.check_ready(ready)
            commit = machine.ready(ready.epoch)

        async def send_go() -> None:
            await session.send(Channel.CONTROL, control.Go(migration, epoch, token).encode())

        # GO journaled, then sent: the source guest never runs again, whatever happens next
        await execute(commit, Effects(journal=lambda kind: journal.append(
            kind, migration, epoch, **record.fields), send_go=send_go))
        result.committed_at = time.monotonic()
        emit(PhaseChanged(note="GO sent"))
    except (XmigError, OSError, asyncio.CancelledError) as err:
        if peer is not None:
            peer.cancel()
        await backend.interrupted()
        if not machine.may_resume_source:
            # GO is journaled: the copy stays paused until the destination's word (I1)
            result.status, result.error = Outcome.IN_DOUBT, f"{type(err).__name__}: {err}"
            if machine.phase is SourcePhase.COMMITTED:
                machine.cut_off()
            else:
                machine.fail(result.error)
            if isinstance(err, asyncio.CancelledError):
                raise
            emit(PhaseChanged(note=f"in doubt: GO journaled, sending it failed: {result.error}"))
            return result

        def aborted(error: str) -> None:
            result.status, result.error = Outcome.ABORTED, error
            emit(PhaseChanged(note=f"aborted: {error}"))

        await run_abort(_abort(machine, session, backend, journal, migration, epoch, token,
                               err), err, aborted)
    await _confirmed(session, backend, machine, emit, reply_timeout_s)
    return result


async def _brownout(backend: SourceBackend, peer: asyncio.Future[control.Message]) -> None:
    """The backend converges; its watch or the destination's word (anything before READY
    is an error) ends the brownout first with their error."""
    async def word() -> None:
        raise control.unexpected(await asyncio.shield(peer), "ready", peer="destination")

    converging = asyncio.ensure_future(backend.converge())
    others = [asyncio.ensure_future(backend.watch()), asyncio.ensure_future(word())]
    tasks = [converging, *others]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
    first = converging if converging in done else next(iter(done))
    for task in tasks:  # every error retrieved; the first one raised
        if task is not first and not task.cancelled():
            task.exception()
    first.result()
    if first is not converging:
        raise ProtocolError("the transfer's watch ended before it converged")


async def _blackout(session: TransportSession, backend: SourceBackend,
                    machine: SourceMachine, peer: asyncio.Future[control.Message],
                    emit: Emit, *, reply_timeout_s: float) -> control.Ready:
    """Pause, seal, FINAL, the last bytes out, READY."""
    result = backend.result
    await execute(machine.pause(), backend.pause_effects())
    result.paused_at = time.monotonic()
    emit(PhaseChanged(note="guest paused"))
    sealed = await backend.seal()
    await session.send(Channel.CONTROL, control.Final(
        result.migration, result.epoch, disk_seq=sealed.disk_seq,
        device_state_bytes=sealed.device_state_bytes).encode())
    machine.final_sent()
    await backend.after_final()
    emit(PhaseChanged(note="final state sent"))
    await backend.transferred(peer)
    try:
        async with asyncio.timeout(reply_timeout_s):
            reply = await peer
    except TimeoutError as err:
        raise DeadlineExceeded(
            f"no READY from the destination within {reply_timeout_s:g} s") from err
    if not isinstance(reply, control.Ready):
        raise control.unexpected(reply, "ready", peer="destination")
    emit(BlackoutStep(step="ready received"))
    return reply


async def _confirmed(session: TransportSession, backend: SourceBackend,
                     machine: SourceMachine, emit: Emit,
                     reply_timeout_s: float) -> None:
    """After GO: the destination confirms it runs the guest (DONE); until then the paused
    copy stays (IN_DOUBT when the confirmation does not come)."""
    result = backend.result
    await backend.after_go()
    why = ""
    try:
        reply = await recv_control(session, reply_timeout_s)
        if isinstance(reply, control.Resumed):
            result.resumed_at, result.resumed_seen_at = reply.at, time.monotonic()
            machine.resumed()
        else:
            why = f"got {reply.type}"
    except (TransportError, DeadlineExceeded, ProtocolError) as err:
        why = f"{type(err).__name__}: {err}"
    await backend.finish()
    if why:  # GO journaled, unconfirmed: the caller settles it
        machine.cut_off()
        result.status, result.error = Outcome.IN_DOUBT, f"no RESUMED after GO: {why}"
        emit(PhaseChanged(note="in doubt: GO journaled, the destination has not confirmed"))
        return
    result.status = Outcome.DONE
    emit(PhaseChanged(note="destination running"))


async def _abort(machine: SourceMachine, session: TransportSession, backend: SourceBackend,
                 journal: Journal, migration: str, epoch: int, token: str,
                 err: BaseException) -> bool:
    """Before GO: ABORT journaled, the backend's transfer ended and its guest running, the
    destination told. Whether the destination may hold a paused copy that has not heard
    ABORT (it may have voted READY: the guest was paused here)."""
    was_paused = machine.phase in (SourcePhase.BLACKOUT, SourcePhase.PREPARE)
    told = True

    async def send_abort() -> None:
        nonlocal told
        told = await tell_abort(session, control.Abort(
            migration, epoch, control.error_text(err), token))

    effects = dataclasses.replace(
        backend.abort_effects(), send_abort=send_abort,
        journal=lambda kind: journal.append(kind, migration, epoch,
                                            reason=f"{type(err).__name__}: {err}"))
    await execute(machine.abort(str(err)), effects)
    return was_paused and not told


def journaled_decision(journal: Journal, migration: str, epoch: int | None = None
                       ) -> control.Go | control.Abort:
    """The source's decision for ``migration`` (its newest epoch, or ``epoch``), as its
    journal holds it, for a destination left in doubt. GO is journaled before it is sent,
    so no GO record means it was never sent: presumed abort."""
    records = [r for r in journal.records() if r.migration == migration
               and (epoch is None or r.epoch == epoch)]
    for rec in reversed(records):
        if rec.kind in ("GO", "ABORT", "START"):
            token = next((str(r.fields.get("token", "")) for r in records
                          if r.kind == "START" and r.epoch == rec.epoch), "")
            if rec.kind == "GO":
                return control.Go(migration, rec.epoch, token)
            return control.Abort(migration, rec.epoch, str(rec.fields.get("reason", "")) or
                                 "no GO was journaled", token)
    return control.Abort(migration, 0, "no such migration in the source's journal")


async def send_decision(session: TransportSession, journal: Journal, migration: str, *,
                        epoch: int | None = None, timeout: float = 60.0
                        ) -> control.Go | control.Abort:
    """Tell a destination left in doubt (a new session to its agent) the decision this
    source journaled for ``migration``, and wait for its answer: RESUMED after GO, DISCARDED
    after ABORT. Returns the decision; raises the destination's typed refusal
    (GuestNotFound: nothing of it there; GuestStateError: not given up yet, try again)."""
    decision = journaled_decision(journal, migration, epoch)
    await session.send(Channel.CONTROL, decision.encode())
    reply = await recv_control(session, timeout)
    if isinstance(reply, control.Refused):
        raise reply.as_error()
    expected = control.Resumed if isinstance(decision, control.Go) else control.Discarded
    if not isinstance(reply, expected):
        raise ProtocolError(f"expected {expected.__struct_config__.tag}, got {reply.type}")
    return decision
