"""The destination agent: receives one migration on a session and runs the guest on GO.

    NEGOTIATE -> create an empty disk image (DiskReceiver) and a paused incoming guest whose
                 disk is served from that image; answer PREPARED (or REFUSED: typed)
    RECEIVING -> apply pages (MemoryReceiver) and disk writes until FINAL + device state
    READY     -> fsync, journal READY, send READY with the digests; the guest stays paused
    RUNNING   -> on GO: journal, load the device state, resume; send RESUMED
    DISCARDED -> on ABORT (or failure before READY): quit the guest, delete the image
    in doubt  -> READY, then the source is lost before GO: the guest stays paused, the
                 image kept; :class:`~xmig.errors.InDoubt` is raised and :func:`resolve`
                 settles it with the source's journaled decision

The destination resumes only on GO (I1); it applies no write of an older epoch (I3).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import xxhash

from xmig import control, guestctl
from xmig.errors import (
    GuestNotFound,
    InDoubt,
    MigrationError,
    ProtocolError,
    StateError,
    XmigError,
)
from xmig.guest.sim import SimConfig, SimGuest
from xmig.journal import Journal
from xmig.memory.engine import MemoryReceiver
from xmig.storage.engine import DiskReceiver
from xmig.storage.nbd import NbdServer
from xmig.storage.raw import RawFileBackend
from xmig.switchover import DestMachine, DestPhase
from xmig.transport import Channel, TransportSession


@dataclass
class DestResult:
    migration: str = ""
    epoch: int = 0
    status: str = "running"
    error: str | None = None
    guest: SimGuest | None = None
    image: RawFileBackend | None = None
    nbd: NbdServer | None = None
    digests: dict[str, str] = field(default_factory=dict)
    resumed_at: float = 0.0
    machine: DestMachine | None = None  #: kept while in doubt, for :func:`resolve`
    receiver: DiskReceiver | None = None


async def receive_migration(
    session: TransportSession,
    *,
    workdir: Path,
    journal: Journal,
    reply_timeout_s: float = 300.0,
    on_event: Callable[[dict[str, Any]], None] = lambda event: None,
    first: control.Negotiate | None = None,
) -> DestResult:
    """Serve one migration arriving on ``session`` (``first``: its NEGOTIATE, if the caller
    read it already, see :func:`first_message`). On success the guest runs here and the
    result holds it (with its image and NBD server: the caller owns them from then on)."""
    result = DestResult()
    msg = first or control.decode(await session.recv(Channel.CONTROL))
    if not isinstance(msg, control.Negotiate):
        raise ProtocolError(f"expected negotiate, got {msg.type}")
    result.migration, result.epoch = msg.migration, msg.epoch
    machine = DestMachine(msg.epoch)
    receiver: DiskReceiver | None = None
    try:
        if msg.guest.get("backend") != "sim":
            raise MigrationError(f"unsupported guest backend {msg.guest.get('backend')!r}")
        workdir.mkdir(parents=True, exist_ok=True)
        image = RawFileBackend.create(workdir / f"{msg.migration}.raw", msg.disk_bytes)
        result.image = image
        verify = bool(msg.guest.get("verify"))
        receiver = DiskReceiver(session, image, epoch=msg.epoch, fresh=True, verify=verify)
        await receiver.start()
        nbd = NbdServer(image)
        sock = workdir / f"{msg.migration}.nbd"
        await nbd.start_unix(sock)
        result.nbd = nbd
        config = replace(SimConfig.from_json(msg.guest["config"]),
                         disk_url=f"nbd+unix:///?socket={sock}",
                         ledger_path=str(workdir / f"{msg.migration}.ledger"))
        result.guest = await asyncio.to_thread(
            SimGuest.start_incoming, config, workdir=workdir, name=f"dst-{msg.migration}")
        await session.send(Channel.CONTROL, control.Prepared(msg.migration).encode())
        machine.prepared()
        on_event({"event": "phase", "phase": machine.phase.value})

        memory = MemoryReceiver(session, result.guest.memory, digest=verify)
        applying = asyncio.create_task(memory.run())
        try:
            final = await _recv(session, reply_timeout_s)
            if isinstance(final, control.Abort):
                raise MigrationError(f"source aborted: {final.reason}")
            if not isinstance(final, control.Final):
                raise ProtocolError(f"expected final, got {final.type}")
            report = await applying
        finally:  # never leave the receiver running (or its error unretrieved)
            if not applying.done():
                applying.cancel()
            await asyncio.wait([applying])
        state = await session.recv(Channel.DEVICE_STATE)
        if len(state) != final.device_state_bytes:
            raise ProtocolError("device state length differs from FINAL's")
        await receiver.wait_applied(final.disk_seq)
        await receiver.flush()
        result.digests = {
            "memory": report.digest.hex() if report.digest else "",
            "device": xxhash.xxh3_64_hexdigest(bytes(state)),
        }
        if verify:
            result.digests["disk"] = await receiver.current_digest()
        # the paused guest takes its device state now, so GO only has to resume it
        await guestctl.call(result.guest.load_device_state, bytes(state))
        machine.final_applied()
        journal.append("READY", msg.migration, msg.epoch)
        await session.send(Channel.CONTROL, control.Ready(
            msg.migration, msg.epoch, result.digests).encode())
        on_event({"event": "phase", "phase": machine.phase.value})

        decision = await _recv(session, reply_timeout_s)
        if isinstance(decision, control.Abort):
            raise MigrationError(f"source aborted: {decision.reason}")
        if not isinstance(decision, control.Go):
            raise ProtocolError(f"expected go, got {decision.type}")
        machine.go(decision.epoch)
    except (XmigError, OSError, TimeoutError) as err:
        result.error = f"{type(err).__name__}: {err}"
        if machine.phase is DestPhase.READY and not isinstance(err, MigrationError):
            # READY and the source is gone: it may have journaled GO. Discarding could
            # lose the guest (I1); running could run it twice. Stay paused, in doubt.
            result.status = "in-doubt"
            result.machine = machine
            result.receiver = receiver
            on_event({"event": "phase", "phase": "in-doubt", "error": result.error})
            raise InDoubt(f"READY for migration {msg.migration} epoch {msg.epoch} and cut "
                          f"off from the source before GO ({result.error}): the guest stays "
                          "paused until the source's decision arrives",
                          migration=msg.migration, epoch=msg.epoch, result=result) from err
        result.status = "discarded"
        if machine.phase is not DestPhase.RUNNING:
            with contextlib.suppress(XmigError):
                machine.abort(str(err))
            journal.append("DISCARDED", msg.migration, msg.epoch, reason=result.error)
            await _discard(result, receiver)
        raise
    await _run_here(result, machine, receiver, journal, session, on_event)
    return result


async def first_message(session: TransportSession, timeout: float = 60.0
                        ) -> control.Negotiate | control.Go | control.Abort:
    """What a new session is for: a migration (NEGOTIATE) or a source settling one left in
    doubt here (its journaled GO or ABORT)."""
    async with asyncio.timeout(timeout):
        msg = control.decode(await session.recv(Channel.CONTROL))
    if not isinstance(msg, control.Negotiate | control.Go | control.Abort):
        raise ProtocolError(f"a session must open with negotiate, go or abort, not {msg.type}")
    return msg


async def settle(session: TransportSession, decision: control.Go | control.Abort,
                 in_doubt: dict[str, tuple[DestResult, Journal]], *,
                 on_event: Callable[[dict[str, Any]], None] = lambda event: None
                 ) -> DestResult:
    """A source reached us again with its decision for a migration left in doubt here:
    apply it (:func:`resolve`); GO is answered RESUMED. A migration not in doubt here is
    refused (typed: GuestNotFound) and nothing changes."""
    held = in_doubt.get(decision.migration)
    if held is None or held[0].epoch != decision.epoch:
        await session.send(Channel.CONTROL, control.Refused(
            decision.migration, "GuestNotFound", f"no migration {decision.migration} epoch "
            f"{decision.epoch} is in doubt here").encode())
        raise GuestNotFound(f"a decision for migration {decision.migration}, which is not "
                            "in doubt here")
    result, journal = held
    await resolve(result, decision, journal=journal, session=session, on_event=on_event)
    del in_doubt[decision.migration]
    return result


async def resolve(result: DestResult, decision: control.Go | control.Abort, *,
                  journal: Journal, session: TransportSession | None = None,
                  on_event: Callable[[dict[str, Any]], None] = lambda event: None) -> None:
    """Settle a migration left in doubt (:class:`~xmig.errors.InDoubt`) with the source's
    journaled decision: GO runs the guest here, ABORT discards it. ``session``, if given,
    is the new session to the source (told RESUMED after GO)."""
    machine, receiver = result.machine, result.receiver
    if result.status != "in-doubt" or machine is None or receiver is None:
        raise StateError(f"migration {result.migration} is {result.status}, not in doubt",
                         state=result.status, event=decision.type)
    if decision.migration != result.migration:
        raise ProtocolError(f"a decision for migration {decision.migration}, not "
                            f"{result.migration}")
    if isinstance(decision, control.Abort):
        machine.abort(decision.reason)
        result.status, result.error = "discarded", f"source aborted: {decision.reason}"
        journal.append("DISCARDED", result.migration, result.epoch, reason=result.error)
        await _discard(result, receiver)
        on_event({"event": "phase", "phase": machine.phase.value})
        return
    machine.go(decision.epoch)
    await _run_here(result, machine, receiver, journal, session, on_event)


async def _run_here(result: DestResult, machine: DestMachine, receiver: DiskReceiver,
                    journal: Journal, session: TransportSession | None,
                    on_event: Callable[[dict[str, Any]], None]) -> None:
    """GO: journaled before the guest runs here."""
    journal.append("RUNNING", result.migration, result.epoch)
    assert result.guest is not None
    await guestctl.call(result.guest.resume)
    result.resumed_at = time.monotonic()
    await receiver.stop()
    if session is not None:
        with contextlib.suppress(XmigError):
            await session.send(Channel.CONTROL, control.Resumed(
                result.migration, result.epoch, result.resumed_at).encode())
    result.status, result.error = "running", None
    on_event({"event": "phase", "phase": machine.phase.value})


async def _recv(session: TransportSession, timeout: float) -> control.Message:
    async with asyncio.timeout(timeout):
        return control.decode(await session.recv(Channel.CONTROL))


async def _discard(result: DestResult, receiver: DiskReceiver | None) -> None:
    """Throw away what was received: the guest process, the NBD server, the image."""
    if receiver is not None:
        with contextlib.suppress(XmigError):
            await receiver.stop()
    if result.guest is not None:
        await asyncio.to_thread(result.guest.quit)
        result.guest = None
    if result.nbd is not None:
        await result.nbd.close()
        result.nbd = None
    if result.image is not None:
        path = result.image.path
        result.image.close()
        result.image = None
        with contextlib.suppress(OSError):
            path.unlink()
