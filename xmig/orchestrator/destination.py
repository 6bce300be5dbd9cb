"""The destination's engine: one arriving migration of any guest backend.

    NEGOTIATE -> the backend checks the request and prepares a paused guest; PREPARED
                 (or REFUSED, typed)
    RECEIVING -> the backend applies what arrives until FINAL
    READY     -> the backend's vote (its digests), journaled (with the migration's token
                 and the source's identity) before it is said; the guest stays paused
    RUNNING   -> on GO: RUNNING journaled, the guest resumed, RESUMED said
    DISCARDED -> on ABORT, or any failure before READY: DISCARDED journaled, the source
                 told (REFUSED before PREPARED, ABORT after), everything made thrown away
    in doubt  -> READY, then cut off from the source before its decision: the paused guest
                 is kept (:meth:`~xmig.guest.backend.DestBackend.hold`) and
                 :class:`~xmig.errors.InDoubt` raised, for the caller to settle

The destination resumes only on GO (I1) and never decides alone. The backend
(:class:`~xmig.guest.backend.DestBackend`) says how its guest is received.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from xmig.errors import (
    GuestNotFound,
    GuestStateError,
    InDoubt,
    MigrationError,
    ProtocolError,
    StateError,
    XmigError,
)
from xmig.events import DestStep, Event, PhaseChanged
from xmig.guest.backend import Arrival, DestBackend, DestResult
from xmig.protocol import control
from xmig.protocol.commit import Effects, execute
from xmig.protocol.journal import Journal
from xmig.protocol.switchover import Action, DestMachine, DestPhase, Step
from xmig.transport import Channel, TransportSession

Events = Callable[[Event], None]


async def recv_word(session: TransportSession, timeout: float,
                    result: DestResult) -> control.Message:
    """The source's next control message (TimeoutError past ``timeout`` seconds); a GO or
    ABORT not for this migration, epoch and token is a ProtocolError."""
    async with asyncio.timeout(timeout):
        msg = control.decode(await session.recv(Channel.CONTROL))
    if isinstance(msg, control.Go | control.Abort):
        control.check_decision(msg, result.migration, result.epoch, result.token)
    return msg


async def run_destination(
    session: TransportSession,
    backend: DestBackend,
    *,
    journal: Journal,
    reply_timeout_s: float = 300.0,
    on_event: Events = lambda event: None,
    first: control.Negotiate | None = None,
) -> DestResult:
    """Serve one migration arriving on ``session`` (``first``: its NEGOTIATE, if the caller
    read it already) into ``backend``. On success the guest runs here (the result holds it:
    the caller owns it from then on). Whatever fails before GO, typed or not, the same
    cleanup runs; READY and cut off from the source is :class:`~xmig.errors.InDoubt`."""
    result = backend.result
    msg = first or control.decode(await session.recv(Channel.CONTROL))
    if not isinstance(msg, control.Negotiate):
        raise ProtocolError(f"expected negotiate, got {msg.type}")
    result.migration, result.epoch, result.token = msg.migration, msg.epoch, msg.token
    result.owner = session.peer_key
    machine = DestMachine(msg.epoch)
    words: list[asyncio.Future[control.Message]] = []

    def next_word() -> asyncio.Future[control.Message]:
        words.append(asyncio.ensure_future(recv_word(session, reply_timeout_s, result)))
        return words[-1]

    def phase(**fields: Any) -> None:
        on_event(PhaseChanged(phase=machine.phase.value, **fields))

    try:
        if not msg.token:
            raise ProtocolError("negotiate carries no token")
        await backend.prepare(session, msg)
        await session.send(Channel.CONTROL, control.Prepared(msg.migration).encode())
        machine.prepared()
        phase()
        final = await backend.receive(next_word())
        if final.epoch != msg.epoch:
            raise ProtocolError(f"final for epoch {final.epoch}, not {msg.epoch}")
        decided = next_word()
        digests = await backend.vote(decided)

        async def send_ready() -> None:
            await session.send(Channel.CONTROL, control.Ready(
                msg.migration, msg.epoch, digests).encode())

        # durable before it is said, with what a settling source must show (token, identity)
        await execute(machine.final_applied(), Effects(
            journal=lambda kind: journal.append(kind, msg.migration, msg.epoch,
                                                token=msg.token, owner=result.owner),
            send_ready=send_ready))
        phase()
        decision = await decided
        if not isinstance(decision, control.Go):
            raise control.unexpected(decision, "go", peer="source")
        on_event(DestStep(step="go", at=time.monotonic()))
        await backend.before_go(session)
        go = machine.go(decision.epoch)
    except BaseException as err:  # typed, a bug or a cancellation: the same cleanup
        for word in words:
            word.cancel()
        await _failed(session, backend, machine, journal, err, on_event)
        raise
    await run_here(backend, go, journal, session, on_event)
    return result


async def run_here(backend: DestBackend, go: Step, journal: Journal,
                   session: TransportSession | None, on_event: Events) -> None:
    """GO: RUNNING journaled before the guest runs here; RESUMED said to ``session``."""
    result = backend.result
    await execute(go, Effects(
        journal=lambda kind: journal.append(kind, result.migration, result.epoch),
        resume_guest=backend.go_effects().resume_guest))
    result.resumed_at = time.monotonic()
    if session is not None:
        with contextlib.suppress(XmigError):
            await session.send(Channel.CONTROL, control.Resumed(
                result.migration, result.epoch, result.resumed_at).encode())
    await backend.after_resume()
    result.status, result.error = Arrival.RUNNING, None
    on_event(PhaseChanged(phase=go.phase.value))


async def _failed(session: TransportSession, backend: DestBackend, machine: DestMachine,
                  journal: Journal, err: BaseException, on_event: Events) -> None:
    """READY and anything but the source's ABORT is in doubt (raises InDoubt; a
    cancellation keeps the paused guest and propagates); else discard everything, journaled,
    shielded from a second cancellation, and tell the source."""
    result = backend.result
    result.error = f"{type(err).__name__}: {err}"
    if machine.phase is DestPhase.READY and not isinstance(err, MigrationError):
        # READY and the source is gone: it may have journaled GO. Discarding could
        # lose the guest (I1); running could run it twice. Stay paused, in doubt.
        machine.cut_off()
        result.status, result.machine = Arrival.IN_DOUBT, machine
        await backend.hold()
        on_event(PhaseChanged(phase="in-doubt", error=result.error))
        if isinstance(err, asyncio.CancelledError):
            return
        raise InDoubt(f"READY for migration {result.migration} epoch {result.epoch} and cut "
                      f"off from the source before GO ({result.error}): the guest stays "
                      "paused until the source's decision arrives",
                      migration=result.migration, epoch=result.epoch, result=result,
                      backend=backend) from err
    result.status = Arrival.DISCARDED
    cleanup = asyncio.ensure_future(_discard_and_tell(session, backend, machine, journal, err))
    try:
        await asyncio.shield(cleanup)
    except asyncio.CancelledError:
        await asyncio.wait([cleanup])
        raise


async def _discard_and_tell(session: TransportSession, backend: DestBackend,
                            machine: DestMachine, journal: Journal,
                            err: BaseException) -> None:
    """The machine's abort step, executed: DISCARDED journaled, then the source told (REFUSED
    before PREPARED, ABORT after; not when it aborted itself) and everything discarded."""
    result = backend.result
    prepared = machine.phase is not DestPhase.NEGOTIATE
    try:
        step = machine.abort(str(err))
    except XmigError:  # a machine that failed already: the same actions, in the same order
        step = Step(DestPhase.DISCARDED, (Action.JOURNAL, Action.DISCARD), journal="DISCARDED")
    journaled = True

    def record(kind: str) -> None:
        nonlocal journaled
        # a full disk: what arrived is deleted first, to make room for the record (before
        # READY nothing was promised, and a restart discards an unfinished directory)
        journaled = journal.append_or_log(kind, result.migration, result.epoch,
                                          reason=result.error)

    async def tell_and_discard() -> None:
        if not isinstance(err, asyncio.CancelledError) and not (
                prepared and isinstance(err, MigrationError)):
            # the source hears it at once (its guest runs on), not at its timeout
            word: control.Message = (
                control.Abort(result.migration, result.epoch,
                              f"destination: {result.error}"[:control.MAX_TEXT])
                if prepared else control.Refused.of(result.migration, err))
            with contextlib.suppress(XmigError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await session.send(Channel.CONTROL, word.encode())
        await backend.discard()

    await execute(step, Effects(journal=record, discard=tell_and_discard))
    if not journaled:
        journal.append_or_log("DISCARDED", result.migration, result.epoch, reason=result.error)


async def tell_discarded(session: TransportSession, migration: str, epoch: int) -> None:
    """Tell a settling source that its ABORT took effect (bounded: it retries otherwise)."""
    with contextlib.suppress(XmigError, TimeoutError):
        async with asyncio.timeout(5.0):
            await session.send(Channel.CONTROL, control.Discarded(migration, epoch).encode())
            await session.drain(Channel.CONTROL)


async def first_message(session: TransportSession, timeout: float = 60.0
                        ) -> control.Negotiate | control.Go | control.Abort | control.Probe:
    """What a new session is for: a migration (NEGOTIATE), a source settling one left in
    doubt here (its journaled GO or ABORT), or a source measuring the link (PROBE)."""
    async with asyncio.timeout(timeout):
        msg = control.decode(await session.recv(Channel.CONTROL))
    if not isinstance(msg, control.Negotiate | control.Go | control.Abort | control.Probe):
        raise ProtocolError(f"a session must open with negotiate, go, abort or probe, not "
                            f"{msg.type}")
    return msg


async def settle(session: TransportSession, decision: control.Go | control.Abort,
                 in_doubt: dict[str, tuple[DestBackend, Journal]], *,
                 on_event: Events = lambda event: None) -> DestBackend:
    """A source reached us again with its decision for a migration left in doubt here:
    apply it (:func:`resolve`); GO is answered RESUMED. A migration not in doubt here, or a
    decision without its token or from another identity than the one that started it, is
    refused (typed: GuestNotFound) and nothing changes."""
    held = in_doubt.get(decision.migration)
    result = None if held is None else held[0].result
    if result is None or result.epoch != decision.epoch or not control.token_matches(
            decision.token, result.token) or session.peer_key != result.owner:
        await session.send(Channel.CONTROL, control.Refused(
            decision.migration, "GuestNotFound", f"no migration {decision.migration} epoch "
            f"{decision.epoch} is in doubt here").encode())
        raise GuestNotFound(f"a decision for migration {decision.migration}, which is not "
                            "in doubt here")
    assert held is not None
    backend, journal = held
    await resolve(backend, decision, journal=journal, session=session, on_event=on_event)
    del in_doubt[decision.migration]
    return backend


async def resolve(backend: DestBackend, decision: control.Go | control.Abort, *,
                  journal: Journal, session: TransportSession | None = None,
                  on_event: Events = lambda event: None) -> None:
    """Settle a migration left in doubt (:class:`~xmig.errors.InDoubt`) with the source's
    journaled decision: GO runs the guest here, ABORT discards it. ``session``, if given,
    is the new session to the source (told RESUMED after GO, DISCARDED after ABORT)."""
    result = backend.result
    machine = result.machine
    if result.status != Arrival.IN_DOUBT or machine is None:
        raise StateError(f"migration {result.migration} is {result.status}, not in doubt",
                         state=result.status, event=decision.type)
    control.check_decision(decision, result.migration, result.epoch, result.token)
    if isinstance(decision, control.Abort):
        step = machine.abort(decision.reason)
        result.status, result.error = Arrival.DISCARDED, f"source aborted: {decision.reason}"
        await execute(step, Effects(journal=lambda kind: journal.append(
            kind, result.migration, result.epoch, reason=result.error),
            discard=backend.discard))
        on_event(PhaseChanged(phase=machine.phase.value))
        if session is not None:
            await tell_discarded(session, result.migration, result.epoch)
        return
    go = machine.go(decision.epoch)
    await backend.before_go(session)
    await run_here(backend, go, journal, session, on_event)


async def force(backend: DestBackend, decision: str, *, journal: Journal,
                on_event: Events = lambda event: None) -> None:
    """An operator decides a migration in doubt here, its source's site gone (``xmig
    resolve --force go|abort``): FORCED journaled before it acts; ``go`` runs the guest
    here, ``abort`` discards it. GuestStateError, and nothing changes, when it is not in
    doubt or the backend cannot take it (:meth:`~xmig.guest.backend.DestBackend.check_force`)."""
    result = backend.result
    if result.status != Arrival.IN_DOUBT or result.machine is None:
        raise GuestStateError(f"migration {result.migration} is {result.status}, not in doubt")
    backend.check_force(decision)
    journal.append("FORCED", result.migration, result.epoch, decision=decision,
                   reason="forced by an operator (xmig resolve)")
    word: control.Go | control.Abort = (
        control.Go(result.migration, result.epoch, result.token) if decision == "go" else
        control.Abort(result.migration, result.epoch, "forced by an operator", result.token))
    await resolve(backend, word, journal=journal, on_event=on_event)
