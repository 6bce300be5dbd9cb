"""Settle a QEMU migration left in doubt, the source's side: the destination voted READY
and lost the source before GO reached it (:class:`~xmig.errors.InDoubt`); its QEMU stays
paused, never run, until the source's journaled decision arrives on a new session. The
destination's side is the engine's (:func:`xmig.orchestrator.destination.settle` with the
held :class:`~xmig.guest.qemu.receive.QemuDest`).

    source (send_qemu_decision)                 destination (QemuDest, settle)
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
from pathlib import Path

import numpy as np

from xmig.errors import ProtocolError
from xmig.guest.qemu import ramcheck
from xmig.orchestrator.source import journaled_decision, send_decision
from xmig.protocol import control
from xmig.protocol.journal import Journal
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
