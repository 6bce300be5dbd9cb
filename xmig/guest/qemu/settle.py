"""Settle a QEMU migration left in doubt: the destination voted READY and lost the source
before GO reached it (:class:`~xmig.errors.InDoubt`); its QEMU stays paused, never run,
until the source's journaled decision arrives on a new session.

    source (send_qemu_decision)                 destination (resolve_qemu)
    --GO (journaled)-->                         RUNNING journaled
    ==RAM repair (DEVICE_STATE)==>              written into the paused guest's RAM
                                                cont
    <--resumed--
    --ABORT (no GO journaled)-->                the QEMU quit, the image deleted
    <--discarded--

GO needs what rode with it the first time: the repair of the RAM chunks QEMU's stream left
stale (:mod:`~xmig.guest.qemu.ramcheck`). Their indices are journaled with GO, and the source
QEMU, paused since pre-switchover and never run after GO, still holds their contents: the
source re-reads them from its RAM file and sends them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import numpy as np

from xmig.errors import GuestNotFound, GuestStateError, ProtocolError, StateError, XmigError
from xmig.guest.qemu import ramcheck
from xmig.guest.qemu.receive import HOST_QMP, QemuDestResult
from xmig.orchestrator.destination import tell_discarded
from xmig.orchestrator.source import journaled_decision, send_decision
from xmig.protocol import control
from xmig.protocol.commit import Effects, execute
from xmig.protocol.journal import Journal
from xmig.protocol.switchover import Step
from xmig.transport import Channel, TransportSession


async def send_qemu_decision(session: TransportSession, journal: Journal, migration: str,
                             mem_path: Path, *, timeout: float = 60.0
                             ) -> control.Go | control.Abort:
    """Tell a destination left in doubt (a new session to its agent) what this source
    journaled for ``migration``; after GO, send the RAM repair again (read from the paused
    source QEMU's RAM file ``mem_path``) and wait for RESUMED. Raises the destination's
    typed refusal (GuestNotFound: nothing of it in doubt there)."""
    decision = journaled_decision(journal, migration)
    if isinstance(decision, control.Abort):
        return await send_decision(session, journal, migration, timeout=timeout)
    await session.send(Channel.CONTROL, decision.encode())
    repair: list[int] = next((list(r.fields.get("ram_repair", []))
                              for r in reversed(journal.records())
                              if r.migration == migration and r.kind == "GO"), [])
    chunks = np.asarray(repair, dtype=np.int64)
    for message in await asyncio.to_thread(ramcheck.encode_fixups, mem_path, chunks):
        await session.send(Channel.DEVICE_STATE, message)
    async with asyncio.timeout(timeout):
        reply = control.decode(await session.recv(Channel.CONTROL))
    if isinstance(reply, control.Refused):
        raise reply.as_error()
    if not isinstance(reply, control.Resumed):
        raise ProtocolError(f"expected resumed, got {reply.type}")
    return decision


async def resolve_qemu(result: QemuDestResult, decision: control.Go | control.Abort, *,
                       journal: Journal, session: TransportSession,
                       timeout: float = 60.0) -> None:
    """Apply the source's decision to a QEMU migration in doubt here: GO runs it (after the
    RAM repair that follows GO on ``session``), ABORT discards it. A decision for another
    migration or epoch, without its token, or from another identity than the one that
    started it, is refused (GuestNotFound) and changes nothing."""
    machine, guest = result.machine, result.guest
    if result.status != "in-doubt" or machine is None or guest is None:
        raise StateError(f"migration {result.migration} is {result.status}, not in doubt",
                         state=result.status, event=decision.type)
    if (decision.migration != result.migration or decision.epoch != result.epoch
            or not control.token_matches(decision.token, result.token)
            or session.peer_key != result.owner):
        await session.send(Channel.CONTROL, control.Refused(
            decision.migration, "GuestNotFound", f"no migration {decision.migration} epoch "
            f"{decision.epoch} is in doubt here").encode())
        raise GuestNotFound(f"a decision for migration {decision.migration} epoch "
                            f"{decision.epoch}, which is not in doubt here")
    if isinstance(decision, control.Abort):
        machine.abort(decision.reason)
        result.status, result.error = "discarded", f"source aborted: {decision.reason}"
        journal.append("DISCARDED", result.migration, result.epoch, reason=result.error)
        await _discard(result)
        await tell_discarded(session, result.migration, result.epoch)
        return
    go = machine.go(decision.epoch)
    more = True
    while more:
        async with asyncio.timeout(timeout):
            message = await session.recv(Channel.DEVICE_STATE)
        count, more = await asyncio.to_thread(ramcheck.apply_fixups, guest.mem_path, message)
        result.ram_chunks_repaired += count
    await _run(result, go, journal)
    result.resumed_at = time.monotonic()
    result.status, result.error = "running", None
    await _release(result)
    with contextlib.suppress(XmigError):
        await session.send(Channel.CONTROL, control.Resumed(
            result.migration, result.epoch, result.resumed_at).encode())


async def force_qemu(result: QemuDestResult, force: str, *, journal: Journal) -> None:
    """An operator's decision (``xmig resolve``) for a QEMU migration in doubt here, the
    source's site gone: journaled (FORCED) first. ``abort`` discards it; ``go`` runs it,
    only if READY found no stale RAM chunk (the repair of any lives at the source and
    comes after GO): otherwise GuestStateError and nothing changes."""
    machine, guest = result.machine, result.guest
    if result.status != "in-doubt" or machine is None or guest is None:
        raise GuestStateError(f"migration {result.migration} is {result.status}, not in doubt")
    if force == "go" and result.ram_stale:
        raise GuestStateError(
            f"migration {result.migration}: {result.ram_stale} RAM chunks were stale at "
            "READY and their repair comes from the source with GO: it cannot run here "
            "without the source (force abort, or let the source settle it)")
    journal.append("FORCED", result.migration, result.epoch, decision=force,
                   reason="forced by an operator (xmig resolve)")
    if force == "abort":
        machine.abort("forced by an operator")
        result.status, result.error = "discarded", "forced abort by an operator"
        journal.append("DISCARDED", result.migration, result.epoch, reason=result.error)
        await _discard(result)
        return
    await _run(result, machine.go(result.epoch), journal)
    result.resumed_at = time.monotonic()
    result.status, result.error = "running", None
    await _release(result)


async def _run(result: QemuDestResult, go: Step, journal: Journal) -> None:
    """GO's step: RUNNING journaled, then the paused QEMU continued."""
    guest = result.guest
    assert guest is not None
    await execute(go, Effects(
        journal=lambda kind: journal.append(kind, result.migration, result.epoch),
        resume_guest=guest.cont))


async def _release(result: QemuDestResult) -> None:
    """The disk receiver and the open image are done with (the QEMU has its own fd)."""
    if result.receiver is not None:
        with contextlib.suppress(XmigError):
            await result.receiver.stop()
        result.receiver = None
    if result.backend is not None:
        result.backend.close()
        result.backend = None


async def _discard(result: QemuDestResult) -> None:
    await _release(result)
    if result.guest is not None:
        await result.guest.quit()
        result.guest = None
    if result.image is not None:
        result.image.unlink(missing_ok=True)
        (result.image.parent / HOST_QMP).unlink(missing_ok=True)
