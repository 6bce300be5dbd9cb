"""Receive a migrating QEMU guest: the destination agent's side of
:mod:`xmig.guest.qemu.migrate` (whose docstring draws both sides).

The destination starts its QEMU paused (``-incoming defer -S``), feeds it the stream from
the session (:class:`~xmig.guest.qemu.stream.DestTunnel`), applies the disk mirror, checks
its RAM against the source's digests once QEMU completed, journals READY and says it, and
runs the guest only on GO (RUNNING journaled first). Before READY any failure discards
everything it made; READY and then cut off from the source is InDoubt: the paused QEMU is
kept until the source's decision (:mod:`xmig.orchestrator.qemusettle`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener

from xmig.errors import GuestStateError, MigrationError, ProtocolError, XmigError
from xmig.events import DestStep, Event
from xmig.guest.backend import DestBackend, DestResult
from xmig.guest.qemu import ramcheck
from xmig.guest.qemu.machine import PopenFn, QemuConfig, QemuGuest
from xmig.guest.qemu.qmpmig import (
    completed_or_message,
    set_capabilities,
    wait_migration,
)
from xmig.guest.qemu.stream import CHUNK, DestTunnel
from xmig.hostpolicy import DEFAULT_POLICY, HostPolicy, check_resources
from xmig.private import private_dir
from xmig.protocol import control
from xmig.protocol.commit import Effects
from xmig.storage.engine import DiskReceiver
from xmig.storage.raw import RawFileBackend
from xmig.transport import Channel, TransportSession


@dataclass
class QemuDestResult(DestResult):
    """What a QEMU destination holds: after GO its running guest (the caller owns it)."""

    guest: QemuGuest | None = None  #: runs here after GO; the caller owns it then
    stream: dict[str, Any] = field(default_factory=dict)
    ready_at: float = 0.0
    ram_chunks_repaired: int = 0
    ram_stale: int = 0  #: RAM chunks found stale at READY (GO brings their repair)
    image: Path | None = None  #: the destination disk image (filled by the receiver)
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
                raise control.unexpected(decision.result(), "the source's RAM digests",
                                         peer="source")
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


class QemuDest(DestBackend):
    """A QEMU destination: QEMU started paused (``-incoming defer -S``) from the host's
    template, fed the stream from the session (DestTunnel), its disk mirror applied to a
    new image (DiskReceiver), its RAM checked against the source's digests."""

    def __init__(self, template: QemuConfig | None, *, workdir: Path,
                 reply_timeout_s: float = 60.0, popen: PopenFn | None = None,
                 launch: Callable[[QemuConfig], Awaitable[QemuGuest]] | None = None,
                 chunk: int = CHUNK, policy: HostPolicy = DEFAULT_POLICY,
                 on_event: Callable[[Event], None] = lambda event: None,
                 result: QemuDestResult | None = None) -> None:
        """``template`` None and ``result`` given: a guest already received, held in doubt
        (to settle or discard it)."""
        self.template, self.workdir, self.timeout = template, workdir, reply_timeout_s
        self.popen, self.launch, self.chunk, self.policy = popen, launch, chunk, policy
        self.on_event = on_event
        self.result: QemuDestResult = result or QemuDestResult()
        self.tunnel: DestTunnel | None = None
        self._listening = contextlib.ExitStack()
        self._events: EventListener | None = None
        self._stale: list[int] = []

    def _step(self, step: str, stale: int | None = None) -> None:
        self.on_event(DestStep(step=step, at=time.monotonic(), stale=stale))

    async def prepare(self, session: TransportSession, negotiate: control.Negotiate) -> None:
        msg, result, workdir = negotiate, self.result, self.workdir
        self._session = session
        # a second monitor, the host's own: it tells whether the guest later left by
        # migration (xmig.service.agentd), whoever holds the first
        if self.template is None:
            raise MigrationError("this QEMU destination holds a guest; it receives none")
        config = incoming_config(self.template, msg)
        config = replace(config, extra=(
            *config.extra, "-qmp", f"unix:{workdir / HOST_QMP},server=on,wait=off"))
        if config.ram_mb << 20 != msg.ram_bytes:
            raise ProtocolError("negotiate: ram_bytes differs from the guest's")
        private_dir(workdir, exist_ok=True)
        check_resources(self.policy, ram_bytes=msg.ram_bytes, disk_bytes=msg.disk_bytes,
                        workdir=workdir)
        if msg.disk_bytes:
            result.image = workdir / IMAGE_NAME
            result.backend = RawFileBackend.create(result.image, msg.disk_bytes)
            result.receiver = DiskReceiver(session, result.backend, epoch=msg.epoch,
                                           fresh=True)
            await result.receiver.start()
            config = replace(config, disk=result.image)
        if self.launch is not None:
            result.guest = await self.launch(config)
        else:
            result.guest = await QemuGuest.launch(config, workdir, popen=self.popen)
        await set_capabilities(result.guest, events=True, return_path=True,
                               late_block_activate=result.receiver is not None)
        self.tunnel = DestTunnel(session, workdir / STREAM_NAME, chunk=self.chunk)
        self._events = self._listening.enter_context(result.guest.listener("MIGRATION"))
        await result.guest.execute("migrate-incoming", {"uri": self.tunnel.uri})
        await self.tunnel.start()

    async def receive(self, final: Any) -> control.Final:
        """QEMU's incoming migration completed and FINAL read, in either order; the disk
        applied up to FINAL's write."""
        guest, events, result = self.result.guest, self._events, self.result
        assert guest is not None and events is not None and self.tunnel is not None
        completing = wait_migration(events, guest, {"completed"}, self.timeout)
        if not await completed_or_message(completing, final):
            word = final.result()
            if not isinstance(word, control.Final):
                raise control.unexpected(word, "final", peer="source")
            # the rest of the stream, unless the session fails first (a source killed
            # after FINAL: not the whole reply timeout with the QEMU waiting for it)
            broken = asyncio.ensure_future(self._session.wait_until(lambda: False))
            try:
                await completed_or_message(
                    wait_migration(events, guest, {"completed"}, self.timeout), broken)
            finally:
                broken.cancel()
        else:
            word = await final
            if not isinstance(word, control.Final):
                raise control.unexpected(word, "final", peer="source")
        self._listening.close()
        self._step("incoming completed")
        if result.receiver is not None:
            await result.receiver.wait_applied(word.disk_seq)
            await result.receiver.flush()
            self._step("disk applied")
        result.stream = self.tunnel.stats()
        return word

    async def vote(self, decision: Any) -> dict[str, str]:
        """The RAM hashed and compared with the source's digests (which cross with the
        last pass); the stale chunks are repaired by the source before GO."""
        guest, result = self.result.guest, self.result
        assert guest is not None and self.tunnel is not None
        ram = await asyncio.to_thread(ramcheck.ram_digests, guest.mem_path)
        self._step("ram hashed")
        theirs = await _source_digests(self._session, decision, self.timeout, len(ram))
        stale = ramcheck.differing(theirs, ram)  # every chunk; sizes differ: typed error
        self._step("ram compared", stale=len(stale))
        result.ram_stale = len(stale)
        result.ready_at = time.monotonic()
        return {"stream_bytes": str(self.tunnel.received.bytes),
                "ram_stale": ramcheck.encode_chunks(stale)}

    async def before_go(self, session: TransportSession | None) -> None:
        """The source's repair of what QEMU's stream left stale follows GO on ``session``
        (a settling source sends it again; forced by an operator: none, see
        :meth:`check_force`)."""
        guest = self.result.guest
        assert guest is not None
        if session is None:
            return
        more = True
        while more:
            async with asyncio.timeout(self.timeout):
                fixups = await session.recv(Channel.DEVICE_STATE)
            count, more = await asyncio.to_thread(ramcheck.apply_fixups, guest.mem_path,
                                                  fixups)
            self.result.ram_chunks_repaired += count
        self._step("ram repaired")

    def check_force(self, force: str) -> None:
        """GO forced without the source: only if READY found no stale RAM chunk (the repair
        of any lives at the source and comes after GO)."""
        result = self.result
        if force == "go" and result.ram_stale:
            raise GuestStateError(
                f"migration {result.migration}: {result.ram_stale} RAM chunks were stale at "
                "READY and their repair comes from the source with GO: it cannot run here "
                "without the source (force abort, or let the source settle it)")

    def go_effects(self) -> Effects:
        guest = self.result.guest
        assert guest is not None
        return Effects(resume_guest=guest.cont)

    async def after_resume(self) -> None:
        """The tunnel, the disk receiver and the open image are done with (the QEMU has
        its own fd)."""
        result = self.result
        if self.tunnel is not None:
            await self.tunnel.close()
        if result.receiver is not None:
            with contextlib.suppress(XmigError):
                await result.receiver.stop()
            result.receiver = None
        if result.backend is not None:
            result.backend.close()
            result.backend = None

    async def hold(self) -> None:
        if self.tunnel is not None:  # QEMU loaded the whole stream: the tunnel is done
            await self.tunnel.close()

    async def discard(self) -> None:
        result = self.result
        self._listening.close()
        if self.tunnel is not None:
            await self.tunnel.close()
        if result.guest is not None:
            await result.guest.quit()
            result.guest = None
        if result.receiver is not None:
            with contextlib.suppress(XmigError):
                await result.receiver.stop()
        if result.backend is not None:
            result.backend.close()
            result.backend = None
        if result.image is not None:
            result.image.unlink(missing_ok=True)
        for sock in (STREAM_NAME, HOST_QMP):  # QEMU's listening sockets
            (self.workdir / sock).unlink(missing_ok=True)
