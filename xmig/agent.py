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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from xmig import control, guestctl
from xmig.commit import Effects, execute
from xmig.errors import (
    GuestNotFound,
    InDoubt,
    MigrationError,
    ProtocolError,
    StateError,
    XmigError,
)
from xmig.guest.sim import SimConfig, SimGuest
from xmig.hostpolicy import DEFAULT_POLICY, HostPolicy, check_resources
from xmig.journal import Journal
from xmig.memory.engine import MemoryReceiver
from xmig.private import private_dir
from xmig.storage.engine import DiskReceiver
from xmig.storage.nbd import NbdServer
from xmig.storage.raw import RawFileBackend
from xmig.switchover import DestMachine, DestPhase, Step
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
    token: str = field(default="", repr=False)  #: the migration's secret (Negotiate's)
    owner: str = ""  #: the identity (certificate) of the source that started it


#: what this host names the files of an arriving guest, in its own (new, private) workdir
IMAGE_NAME, NBD_NAME, LEDGER_NAME = "disk.raw", "disk.nbd", "guest.ledger"


def incoming_sim_config(spec: control.SimSpec, *, workdir: Path,
                        policy: HostPolicy) -> SimConfig:
    """The destination guest: the source's definition, this host's paths, nice and address
    (ConfigError for a definition the guest cannot run)."""
    inf = float("inf")
    return SimConfig(
        ram_bytes=spec.ram_bytes, disk_bytes=spec.disk_bytes, workload=spec.workload,
        rate_Bps=inf if spec.rate_Bps is None else spec.rate_Bps,
        hotset_bytes=spec.hotset_bytes, seed=spec.seed, zero_fraction=spec.zero_fraction,
        text_fraction=spec.text_fraction, write_size=spec.write_size,
        disk_rate_Bps=inf if spec.disk_rate_Bps is None else spec.disk_rate_Bps,
        table_bytes=spec.table_bytes, oltp_keys=spec.oltp_keys,
        disk_queue_depth=spec.disk_queue_depth,
        udp_addr=(policy.udp_host, 0) if spec.udp else None,
        nice=policy.guest_nice, shm_dir=str(policy.shm_dir),
        disk_url=f"nbd+unix:///?socket={workdir / NBD_NAME}",
        ledger_path=str(workdir / LEDGER_NAME))


async def receive_migration(
    session: TransportSession,
    *,
    workdir: Path,
    journal: Journal,
    reply_timeout_s: float = 300.0,
    on_event: Callable[[dict[str, Any]], None] = lambda event: None,
    first: control.Negotiate | None = None,
    policy: HostPolicy = DEFAULT_POLICY,
) -> DestResult:
    """Serve one migration arriving on ``session`` (``first``: its NEGOTIATE, if the caller
    read it already, see :func:`first_message`) into ``workdir`` (this host's choice; every
    file in it is named here). On success the guest runs here and the result holds it (with
    its image and NBD server: the caller owns them from then on). Whatever fails before GO,
    typed or not, the same cleanup runs: before PREPARED the source is told REFUSED, after
    it ABORT; READY and cut off from the source is :class:`~xmig.errors.InDoubt`."""
    result = DestResult()
    msg = first or control.decode(await session.recv(Channel.CONTROL))
    if not isinstance(msg, control.Negotiate):
        raise ProtocolError(f"expected negotiate, got {msg.type}")
    result.migration, result.epoch, result.token = msg.migration, msg.epoch, msg.token
    result.owner = session.peer_key
    machine = DestMachine(msg.epoch)
    receiver: DiskReceiver | None = None
    try:
        receiver = await _prepare(session, msg, workdir, policy, result)
        await session.send(Channel.CONTROL, control.Prepared(msg.migration).encode())
        machine.prepared()
        on_event({"event": "phase", "phase": machine.phase.value})
        await _receive_state(session, msg, result, receiver, reply_timeout_s)
        async def send_ready() -> None:
            await session.send(Channel.CONTROL, control.Ready(
                msg.migration, msg.epoch, result.digests).encode())

        # durable before it is said, with what a settling source must show (token, identity)
        await execute(machine.final_applied(), Effects(
            journal=lambda kind: journal.append(kind, msg.migration, msg.epoch,
                                                token=msg.token, owner=result.owner),
            send_ready=send_ready))
        on_event({"event": "phase", "phase": machine.phase.value})
        decision = await _recv(session, reply_timeout_s)
        if isinstance(decision, control.Go | control.Abort):
            control.check_decision(decision, result.migration, result.epoch, result.token)
        if isinstance(decision, control.Abort):
            raise MigrationError(f"source aborted: {decision.reason}")
        if not isinstance(decision, control.Go):
            raise ProtocolError(f"expected go, got {decision.type}")
        go = machine.go(decision.epoch)
    except BaseException as err:
        await _failed(session, result, machine, receiver, journal, err, on_event)
        raise
    await _run_here(result, go, receiver, journal, session, on_event)
    return result


async def _prepare(session: TransportSession, msg: control.Negotiate, workdir: Path,
                   policy: HostPolicy, result: DestResult) -> DiskReceiver:
    """Check, then make: the image, its receiver, the NBD server, the paused guest."""
    if not isinstance(msg.guest, control.SimGuest):
        raise MigrationError(f"unsupported guest backend {msg.guest.backend!r}")
    if not msg.token:
        raise ProtocolError("negotiate carries no token")
    if msg.guest.config.ram_bytes != msg.ram_bytes:
        raise ProtocolError("negotiate: ram_bytes differs from the guest's")
    private_dir(workdir, exist_ok=True)
    check_resources(policy, ram_bytes=msg.ram_bytes, disk_bytes=msg.disk_bytes,
                    workdir=workdir)
    config = incoming_sim_config(msg.guest.config, workdir=workdir, policy=policy)
    image = RawFileBackend.create(workdir / IMAGE_NAME, msg.disk_bytes)
    result.image = image
    receiver = DiskReceiver(session, image, epoch=msg.epoch, fresh=True,
                            verify=msg.guest.verify)
    result.receiver = receiver
    await receiver.start()
    nbd = NbdServer(image)
    result.nbd = nbd
    await nbd.start_unix(workdir / NBD_NAME)
    result.guest = await asyncio.to_thread(
        SimGuest.start_incoming, config, workdir=workdir, name="incoming")
    return receiver


async def _receive_state(session: TransportSession, msg: control.Negotiate,
                         result: DestResult, receiver: DiskReceiver,
                         reply_timeout_s: float) -> None:
    """Pages and disk writes until FINAL and the device state; all applied and fsynced, the
    digests taken, the device state loaded into the paused guest."""
    assert result.guest is not None
    verify = msg.guest.verify if isinstance(msg.guest, control.SimGuest) else False
    memory = MemoryReceiver(session, result.guest.memory, digest=verify)
    applying = asyncio.create_task(memory.run())
    try:
        final = await _recv(session, reply_timeout_s)
        if isinstance(final, control.Abort):
            control.check_decision(final, result.migration, result.epoch, result.token)
            raise MigrationError(f"source aborted: {final.reason}")
        if not isinstance(final, control.Final):
            raise ProtocolError(f"expected final, got {final.type}")
        report = await applying
    finally:  # never leave the receiver running (or its error unretrieved)
        if not applying.done():
            applying.cancel()
        await asyncio.wait([applying])
    if final.epoch != msg.epoch:
        raise ProtocolError(f"final for epoch {final.epoch}, not {msg.epoch}")
    async with asyncio.timeout(reply_timeout_s):
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


async def _failed(session: TransportSession, result: DestResult, machine: DestMachine,
                  receiver: DiskReceiver | None, journal: Journal, err: BaseException,
                  on_event: Callable[[dict[str, Any]], None]) -> None:
    """Whatever failed (typed, a bug, a cancellation): READY and anything but the source's
    ABORT is in doubt (raises InDoubt; a cancellation keeps the paused guest and
    propagates); else discard everything, journaled, shielded from a second cancellation, and
    tell the source (REFUSED before PREPARED, ABORT after)."""
    result.error = f"{type(err).__name__}: {err}"
    if machine.phase is DestPhase.READY and not isinstance(err, MigrationError):
        # READY and the source is gone: it may have journaled GO. Discarding could
        # lose the guest (I1); running could run it twice. Stay paused, in doubt.
        machine.cut_off()
        result.status, result.machine, result.receiver = "in-doubt", machine, receiver
        on_event({"event": "phase", "phase": "in-doubt", "error": result.error})
        if isinstance(err, asyncio.CancelledError):
            return
        raise InDoubt(f"READY for migration {result.migration} epoch {result.epoch} and cut "
                      f"off from the source before GO ({result.error}): the guest stays "
                      "paused until the source's decision arrives",
                      migration=result.migration, epoch=result.epoch, result=result) from err
    result.status = "discarded"
    if machine.phase is DestPhase.RUNNING:
        return
    cleanup = asyncio.ensure_future(_discard_and_tell(session, result, machine, receiver,
                                                      journal, err))
    try:
        await asyncio.shield(cleanup)
    except asyncio.CancelledError:
        await asyncio.wait([cleanup])
        raise


async def _discard_and_tell(session: TransportSession, result: DestResult,
                            machine: DestMachine, receiver: DiskReceiver | None,
                            journal: Journal, err: BaseException) -> None:
    prepared = machine.phase is not DestPhase.NEGOTIATE
    with contextlib.suppress(XmigError):
        machine.abort(str(err))
    # a full disk: what arrived is deleted first, to make room for the record (before READY
    # nothing was promised, and a restart discards an unfinished directory)
    journaled = journal.append_or_log("DISCARDED", result.migration, result.epoch,
                                      reason=result.error)
    if not isinstance(err, asyncio.CancelledError) and not (
            prepared and isinstance(err, MigrationError)):
        word: control.Message = (
            control.Abort(result.migration, result.epoch,
                          f"destination: {result.error}"[:control.MAX_TEXT])
            if prepared else control.Refused.of(result.migration, err))
        with contextlib.suppress(XmigError, TimeoutError):
            async with asyncio.timeout(2.0):
                await session.send(Channel.CONTROL, word.encode())
    await _discard(result, receiver)
    if not journaled:
        journal.append_or_log("DISCARDED", result.migration, result.epoch, reason=result.error)


async def tell_discarded(session: TransportSession, migration: str, epoch: int) -> None:
    """Tell a settling source that its ABORT took effect (bounded: it retries otherwise)."""
    with contextlib.suppress(XmigError, TimeoutError):
        async with asyncio.timeout(5.0):
            await session.send(Channel.CONTROL, control.Discarded(migration, epoch).encode())
            await session.drain(Channel.CONTROL)


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
    apply it (:func:`resolve`); GO is answered RESUMED. A migration not in doubt here, or a
    decision without its token or from another identity than the one that started it, is
    refused (typed: GuestNotFound) and nothing changes."""
    held = in_doubt.get(decision.migration)
    if held is None or held[0].epoch != decision.epoch or not control.token_matches(
            decision.token, held[0].token) or session.peer_key != held[0].owner:
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
    is the new session to the source (told RESUMED after GO, DISCARDED after ABORT)."""
    machine, receiver = result.machine, result.receiver
    if result.status != "in-doubt" or machine is None or receiver is None:
        raise StateError(f"migration {result.migration} is {result.status}, not in doubt",
                         state=result.status, event=decision.type)
    control.check_decision(decision, result.migration, result.epoch, result.token)
    if isinstance(decision, control.Abort):
        machine.abort(decision.reason)
        result.status, result.error = "discarded", f"source aborted: {decision.reason}"
        journal.append("DISCARDED", result.migration, result.epoch, reason=result.error)
        await _discard(result, receiver)
        on_event({"event": "phase", "phase": machine.phase.value})
        if session is not None:
            await tell_discarded(session, result.migration, result.epoch)
        return
    await _run_here(result, machine.go(decision.epoch), receiver, journal, session, on_event)


async def _run_here(result: DestResult, go: Step, receiver: DiskReceiver,
                    journal: Journal, session: TransportSession | None,
                    on_event: Callable[[dict[str, Any]], None]) -> None:
    """GO: journaled before the guest runs here."""
    guest = result.guest
    assert guest is not None

    async def resume_guest() -> None:
        await guestctl.call(guest.resume)

    await execute(go, Effects(
        journal=lambda kind: journal.append(kind, result.migration, result.epoch),
        resume_guest=resume_guest))
    result.resumed_at = time.monotonic()
    await receiver.stop()
    if session is not None:
        with contextlib.suppress(XmigError):
            await session.send(Channel.CONTROL, control.Resumed(
                result.migration, result.epoch, result.resumed_at).encode())
    result.status, result.error = "running", None
    on_event({"event": "phase", "phase": go.phase.value})


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
