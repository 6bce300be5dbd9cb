"""Receive a migrating QEMU guest: the destination agent's side of
:mod:`xmig.guest.qemu.migrate` (whose docstring draws both sides).

The destination starts its QEMU paused (``-incoming defer -S``), feeds it the stream from
the session (:class:`~xmig.guest.qemu.stream.DestTunnel`), applies the disk mirror, checks
its RAM against the source's digests once QEMU completed, journals READY and says it, and
runs the guest only on GO (RUNNING journaled first). Before READY any failure discards
everything it made; READY and then cut off from the source is InDoubt: the paused QEMU is
kept until the source's decision (:mod:`xmig.guest.qemu.settle`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from xmig import control
from xmig.commit import Effects, execute
from xmig.errors import (
    InDoubt,
    MigrationError,
    ProtocolError,
    XmigError,
)
from xmig.guest.qemu import ramcheck
from xmig.guest.qemu.machine import PopenFn, QemuConfig, QemuGuest
from xmig.guest.qemu.qmpmig import (
    completed_or_message,
    recv_message,
    set_capabilities,
    unexpected,
    wait_migration,
)
from xmig.guest.qemu.stream import CHUNK, DestTunnel
from xmig.hostpolicy import DEFAULT_POLICY, HostPolicy, check_resources
from xmig.journal import Journal
from xmig.private import private_dir
from xmig.storage.engine import DiskReceiver
from xmig.storage.raw import RawFileBackend
from xmig.switchover import DestMachine, DestPhase
from xmig.transport import Channel, TransportSession


@dataclass
class QemuDestResult:
    migration: str = ""
    epoch: int = 0
    status: str = "running"
    error: str | None = None
    guest: QemuGuest | None = None  #: runs here after GO; the caller owns it then
    stream: dict[str, Any] = field(default_factory=dict)
    ready_at: float = 0.0
    resumed_at: float = 0.0
    ram_chunks_repaired: int = 0
    ram_stale: int = 0  #: RAM chunks found stale at READY (GO brings their repair)
    image: Path | None = None  #: the destination disk image (filled by the receiver)
    token: str = field(default="", repr=False)  #: the migration's secret (Negotiate's)
    owner: str = ""  #: the identity (certificate) of the source that started it
    machine: DestMachine | None = None
    receiver: DiskReceiver | None = None  #: kept while in doubt
    backend: RawFileBackend | None = None  #: the image, open, while in doubt



async def _source_digests(session: TransportSession, decision: asyncio.Future[control.Message],
                          timeout: float, chunks: int) -> ramcheck.Digests:
    """The source's RAM digests (sent by :class:`~xmig.guest.qemu.migrate.QemuSource`),
    as many as this RAM has ``chunks`` (a peer's other count is refused, not kept); an
    ABORT (or any control message) before them ends the wait with its error."""
    assembler = ramcheck.DigestAssembler(chunks)
    async with asyncio.timeout(timeout):
        while not assembler.done:
            receiving = asyncio.ensure_future(session.recv(Channel.DEVICE_STATE))
            waiting: list[asyncio.Future[Any]] = [receiving, decision]
            try:
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not receiving.done():
                    receiving.cancel()
            if not receiving.done() or receiving.cancelled():
                raise unexpected(decision.result(), "the source's RAM digests")
            assembler.add(receiving.result())
    return assembler.digests()



#: what this host names an arriving QEMU guest's files, in its own (new, private) workdir:
#: its image, QEMU's incoming stream socket, the host's own QMP monitor of it
IMAGE_NAME, STREAM_NAME, HOST_QMP = "disk.raw", "mig.in", "agent.qmp"


def incoming_config(template: QemuConfig, negotiate: control.Negotiate) -> QemuConfig:
    """The destination QEMU: ``template``'s paths and binary, the source's RAM, vCPUs and
    command line; paused (``-S``), waiting for ``migrate-incoming`` (``-incoming defer``)."""
    if not isinstance(negotiate.guest, control.QemuGuest):
        raise MigrationError(f"unsupported guest backend {negotiate.guest.backend!r}")
    src = negotiate.guest.config
    return replace(template, ram_mb=src.ram_mb, smp=src.smp, append=src.append,
                   extra=(*template.extra, "-incoming", "defer", "-S"))


async def receive_qemu(
    session: TransportSession,
    template: QemuConfig,
    *,
    workdir: Path,
    journal: Journal,
    reply_timeout_s: float = 300.0,
    popen: PopenFn | None = None,
    launch: Callable[[QemuConfig], Awaitable[QemuGuest]] | None = None,
    chunk: int = CHUNK,
    on_event: Callable[[dict[str, Any]], None] = lambda event: None,
    first: control.Negotiate | None = None,
    policy: HostPolicy = DEFAULT_POLICY,
) -> QemuDestResult:
    """Serve one QEMU migration arriving on ``session``: start the destination QEMU from
    ``template`` (:func:`incoming_config`), feed it the stream, vote READY when it has
    loaded everything, run it on GO. The result holds the running guest (the caller owns
    it). Before READY a failure discards the destination; READY and then cut off from the
    source: InDoubt (the guest stays paused). Every file is named here, in ``workdir``
    (this host's choice); the source's words are labels. Whatever fails, typed or not, the
    same cleanup runs."""
    result = QemuDestResult()
    msg = first or control.decode(await session.recv(Channel.CONTROL))
    if not isinstance(msg, control.Negotiate):
        raise ProtocolError(f"expected negotiate, got {msg.type}")
    result.migration, result.epoch, result.token = msg.migration, msg.epoch, msg.token
    result.owner = session.peer_key
    machine = DestMachine(msg.epoch)
    tunnel: DestTunnel | None = None
    decision_task: asyncio.Future[control.Message] | None = None
    receiver: DiskReceiver | None = None
    image: RawFileBackend | None = None
    try:
        if not msg.token:
            raise ProtocolError("negotiate carries no token")
        # a second monitor, the host's own: it tells whether the guest later left by
        # migration (xmig.agentd), whoever holds the first
        config = incoming_config(template, msg)
        config = replace(config, extra=(
            *config.extra, "-qmp", f"unix:{workdir / HOST_QMP},server=on,wait=off"))
        if config.ram_mb << 20 != msg.ram_bytes:
            raise ProtocolError("negotiate: ram_bytes differs from the guest's")
        private_dir(workdir, exist_ok=True)
        check_resources(policy, ram_bytes=msg.ram_bytes, disk_bytes=msg.disk_bytes,
                        workdir=workdir)
        if msg.disk_bytes:
            result.image = workdir / IMAGE_NAME
            image = RawFileBackend.create(result.image, msg.disk_bytes)
            receiver = DiskReceiver(session, image, epoch=msg.epoch, fresh=True)
            await receiver.start()
            config = replace(config, disk=result.image)
        if launch is not None:
            result.guest = await launch(config)
        else:
            result.guest = await QemuGuest.launch(config, workdir, popen=popen)
        guest = result.guest
        await set_capabilities(guest, events=True, return_path=True,
                                late_block_activate=receiver is not None)
        tunnel = DestTunnel(session, workdir / STREAM_NAME, chunk=chunk)
        with guest.listener("MIGRATION") as events:
            await guest.execute("migrate-incoming", {"uri": tunnel.uri})
            await tunnel.start()
            await session.send(Channel.CONTROL, control.Prepared(msg.migration).encode())
            machine.prepared()
            on_event({"event": "phase", "phase": machine.phase.value})
            # FINAL (or ABORT) is read alongside
            decision_task = asyncio.ensure_future(recv_message(session, reply_timeout_s))
            completing = wait_migration(events, guest, {"completed"}, reply_timeout_s)
            if not await completed_or_message(completing, decision_task):
                final = decision_task.result()
                if not isinstance(final, control.Final):
                    raise unexpected(final, "final")
                # the rest of the stream, unless the session fails first (a source killed
                # after FINAL: not the whole reply timeout with the QEMU waiting for it)
                broken = asyncio.ensure_future(session.wait_until(lambda: False))
                try:
                    await completed_or_message(
                        wait_migration(events, guest, {"completed"}, reply_timeout_s), broken)
                finally:
                    broken.cancel()
            else:
                final = await decision_task
                if not isinstance(final, control.Final):
                    raise unexpected(final, "final")
            decision_task = asyncio.ensure_future(recv_message(session, reply_timeout_s))
        on_event({"event": "step", "step": "incoming completed", "at": time.monotonic()})
        if receiver is not None:
            await receiver.wait_applied(final.disk_seq)
            await receiver.flush()
            on_event({"event": "step", "step": "disk applied", "at": time.monotonic()})
        result.stream = tunnel.stats()
        ram = await asyncio.to_thread(ramcheck.ram_digests, guest.mem_path)
        on_event({"event": "step", "step": "ram hashed", "at": time.monotonic()})
        theirs = await _source_digests(session, decision_task, reply_timeout_s, len(ram))
        stale = ramcheck.differing(theirs, ram)  # every chunk; sizes differ: typed error
        on_event({"event": "step", "step": "ram compared", "at": time.monotonic(),
                  "stale": len(stale)})
        result.ram_stale = len(stale)
        async def send_ready() -> None:
            assert tunnel is not None
            result.ready_at = time.monotonic()
            await session.send(Channel.CONTROL, control.Ready(
                msg.migration, msg.epoch, {"stream_bytes": str(tunnel.received.bytes),
                                           "ram_stale": ramcheck.encode_chunks(stale)}
                ).encode())

        await execute(machine.final_applied(), Effects(
            journal=lambda kind: journal.append(kind, msg.migration, msg.epoch,
                                                token=msg.token, owner=result.owner),
            send_ready=send_ready))
        on_event({"event": "step", "step": "ready sent", "at": time.monotonic()})
        on_event({"event": "phase", "phase": machine.phase.value})
        decision = await decision_task
        if isinstance(decision, control.Go | control.Abort):
            control.check_decision(decision, result.migration, result.epoch, result.token)
        if not isinstance(decision, control.Go):
            raise unexpected(decision, "go")
        on_event({"event": "step", "step": "go", "at": time.monotonic()})
        # the source's repair of what QEMU's stream left stale was sent before GO
        more = True
        while more:
            async with asyncio.timeout(reply_timeout_s):
                fixups = await session.recv(Channel.DEVICE_STATE)
            count, more = await asyncio.to_thread(ramcheck.apply_fixups, guest.mem_path,
                                                  fixups)
            result.ram_chunks_repaired += count
        on_event({"event": "step", "step": "ram repaired", "at": time.monotonic()})
        go = machine.go(decision.epoch)
    except BaseException as err:  # typed, a bug or a cancellation: the same cleanup
        if decision_task is not None:
            decision_task.cancel()
        result.error = f"{type(err).__name__}: {err}"
        prepared = machine.phase is not DestPhase.NEGOTIATE
        if not prepared and not isinstance(err, asyncio.CancelledError):
            # before PREPARED: the source learns why at once (and nothing is left)
            with contextlib.suppress(XmigError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await session.send(Channel.CONTROL,
                                       control.Refused.of(msg.migration, err).encode())
        if machine.phase is DestPhase.READY and not isinstance(err, MigrationError):
            machine.cut_off()
            result.status, result.machine = "in-doubt", machine
            result.receiver, result.backend = receiver, image
            if tunnel is not None:  # QEMU loaded the whole stream: the tunnel is done
                await tunnel.close()
            on_event({"event": "phase", "phase": "in-doubt", "error": result.error})
            if isinstance(err, asyncio.CancelledError):
                raise
            raise InDoubt(f"READY for migration {msg.migration} epoch {msg.epoch} and cut off "
                          f"from the source before GO ({result.error}): the QEMU guest stays "
                          "paused until the source's decision arrives",
                          migration=msg.migration, epoch=msg.epoch, result=result) from err
        result.status = "discarded"
        with contextlib.suppress(XmigError):
            machine.abort(str(err))
        # a full disk: what arrived is deleted first, to make room for the record (before
        # READY nothing was promised, and a restart discards an unfinished directory)
        journaled = journal.append_or_log("DISCARDED", msg.migration, msg.epoch,
                                          reason=result.error)
        if prepared and not isinstance(err, MigrationError | asyncio.CancelledError):
            # the source hears it at once (its QEMU runs on), not at its timeout
            with contextlib.suppress(XmigError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await session.send(Channel.CONTROL, control.Abort(
                        msg.migration, msg.epoch,
                        f"destination: {result.error}"[:control.MAX_TEXT]).encode())
        if tunnel is not None:
            await tunnel.close()
        if result.guest is not None:
            await result.guest.quit()
            result.guest = None
        if receiver is not None:
            with contextlib.suppress(XmigError):
                await receiver.stop()
        if image is not None:
            image.close()
        if result.image is not None:
            result.image.unlink(missing_ok=True)
        for sock in (STREAM_NAME, HOST_QMP):  # QEMU's listening sockets
            (workdir / sock).unlink(missing_ok=True)
        if not journaled:
            journal.append_or_log("DISCARDED", msg.migration, msg.epoch, reason=result.error)
        raise
    guest = result.guest
    assert guest is not None

    def journal_running(kind: str) -> None:
        journal.append(kind, msg.migration, msg.epoch)
        on_event({"event": "step", "step": "journaled", "at": time.monotonic()})

    # GO: journaled before the guest runs here
    await execute(go, Effects(journal=journal_running, resume_guest=guest.cont))
    result.resumed_at = time.monotonic()
    with contextlib.suppress(XmigError):
        await session.send(Channel.CONTROL, control.Resumed(
            msg.migration, msg.epoch, result.resumed_at).encode())
    await tunnel.close()
    if receiver is not None:
        await receiver.stop()
    if image is not None:
        image.close()
    result.status = "running"
    on_event({"event": "phase", "phase": machine.phase.value})
    return result
