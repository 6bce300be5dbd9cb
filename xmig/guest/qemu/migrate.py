"""Migrate a running QEMU guest over an xmig session: the source agent's side; the destination
agent's is :mod:`xmig.guest.qemu.receive`.

    source agent (migrate_qemu)                     destination agent (receive_qemu)
    NEGOTIATE  --negotiate (QEMU config)-->         start QEMU -incoming defer -S, caps,
                                                    migrate-incoming unix:D, DestTunnel
               <--prepared--
    BROWNOUT   caps (events, pause-before-switchover; no return-path), downtime-limit,
               SourceTunnel, migrate unix:S; max-bandwidth follows the delivery rate
               (BandwidthGovernor); QEMU's stream flows MEMORY ==>
    BLACKOUT   MIGRATION pre-switchover: QEMU paused the source vCPUs; migrate-continue;
               RAM hashed, digests ==DEVICE_STATE==>
                                                    MIGRATION completed: all loaded, paused;
                                                    RAM hashed, compared with the source's
               <--ready (stream bytes, stale chunks)--  READY journaled
               stale chunks' bytes ==DEVICE_STATE==>
    PREPARE    source completed + READY: GO journaled, then sent
               --go-->                              RUNNING journaled, cont
               <--resumed--

The source side is :class:`QemuSource`, a backend of the one engine
(:func:`xmig.orchestrator.source.run_source`), which owns the protocol and the commit: the
destination QEMU runs only on GO; the source writes GO to its journal before sending it, and
its QEMU, paused since ``pre-switchover``, is never continued after that. Before GO any
failure aborts: the disk mirror ended (its job cancelled with the vCPUs stopped,
:meth:`QemuSource.abort_effects`), QEMU's stream cut, ``migrate_cancel`` only if it must
(:func:`~xmig.guest.qemu.qmpmig.cancel_migration`; QEMU resumes the source vCPUs itself if
it had paused them; ``cont`` makes sure), ABORT journaled and sent; the destination quits
its QEMU.

The destination answers READY as soon as its QEMU completed the incoming migration and its
RAM was checked against the source's digests (:mod:`~xmig.guest.qemu.ramcheck`; they
crossed with the last pass): the stream is self-delimiting and QEMU checked it, and the
blackout crosses the link only for the last bytes, READY and GO (the source's QEMU, without
a return path, reaches ``completed`` once its last bytes are in the tunnel, before READY
arrives: READY, not QEMU's return path, says the destination loaded them).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener

from xmig.convergence import ControllerConfig
from xmig.convergence.joint import JointThrottle, for_session
from xmig.errors import MigrationError, NotConverging, XmigError
from xmig.events import BlackoutStep, DowntimeBudget, PhaseChanged, QemuProgress
from xmig.guest.backend import Emit, GoRecord, Sealed, SourceBackend, SourceResult
from xmig.guest.qemu import ramcheck
from xmig.guest.qemu.budget import split_budget
from xmig.guest.qemu.machine import QemuGuest
from xmig.guest.qemu.mirror import SourceDiskMirror, disk_size
from xmig.guest.qemu.qmpmig import (
    cancel_migration,
    completed_or_message,
    set_capabilities,
    wait_migration,
)
from xmig.guest.qemu.stream import CHUNK, BandwidthGovernor, SourceTunnel
from xmig.guest.qemu.throttle import MAX_THROTTLE as QEMU_MAX_THROTTLE
from xmig.guest.qemu.throttle import QEMU_ALPHA, QemuSdps
from xmig.protocol import control
from xmig.protocol.commit import Effects, nothing
from xmig.storage.engine import DEFAULT_BOUND
from xmig.transport import Channel, TransportSession

BACKEND = "qemu"
MiB = 1 << 20
#: QEMU's first max-bandwidth when neither the options nor the session's rate cap say more:
#: a few doublings (BandwidthGovernor) from a fast link's rate, a little over a slow one's
INITIAL_BANDWIDTH_Bps = 16 << 20


@dataclass(frozen=True)
class QemuMigrationOptions:
    #: the whole pause-to-resume allowed (``--max-downtime``); QEMU's own ``downtime-limit``
    #: is what is left of it after the commit's round trips and checks
    #: (:mod:`~xmig.guest.qemu.budget`)
    downtime_limit_ms: int = 300
    timeout_s: float = 300.0  #: pre-copy that has not reached pre-switchover by then aborts
    reply_timeout_s: float = 60.0  #: for each answer of the destination
    #: pre-switchover to GO: past it the migration aborts and the source QEMU runs on
    blackout_timeout_s: float = 10.0
    #: QEMU's max-bandwidth until the stream's rate is known (None: the session's rate cap,
    #: else :data:`INITIAL_BANDWIDTH_Bps`)
    initial_bandwidth_Bps: float | None = None
    bandwidth_period_s: float = 0.25
    chunk: int = CHUNK
    disk: bool = True  #: mirror the source's disk (when it has one)
    mirror_bound: int = DEFAULT_BOUND  #: bytes of guest writes queued before acks wait
    sdps: bool = False
    """Throttle the vCPUs (cgroup CPU quota, :mod:`~xmig.guest.qemu.throttle`) when they
    outrun the link. Off by default: it slows a writer in proportion to the CPU time its
    dirtying costs, and its floor is 0.1 % of the CPU (the controller's 0.999: a 1 ms
    quota in a 1 s period): that converges a 1.3–2 GB/s writer of whole pages over
    200 Mbit/s (tests/guest/qemu/test_sdps.py), where 1 % of it was a coin toss; a writer
    dirtying a page per 64-byte store under TCG dirtied 8-20 MiB/s at a 1 % floor."""
    #: the CPU quota's period (cfs_period_us) up to a 99 % throttle, lengthened past it
    sdps_period_us: int = 100_000


@dataclass
class QemuSourceResult(SourceResult):
    """What a QEMU source saw (``paused_at``: QEMU reported pre-switchover, it had stopped
    the vCPUs)."""

    completed_at: float = 0.0  #: QEMU reported completed
    stream: dict[str, Any] = field(default_factory=dict)
    bandwidth: list[tuple[float, int]] = field(default_factory=list)
    qemu_info: dict[str, Any] = field(default_factory=dict)  #: query-migrate at the end
    ram_chunks_repaired: int = 0  #: RAM chunks QEMU's stream left stale (ramcheck)
    disk_seq: int = 0  #: the last mirrored write (FINAL)
    disk: dict[str, Any] = field(default_factory=dict)  #: mirror figures
    mirror_ready_at: float = 0.0


def guest_description(guest: QemuGuest) -> control.QemuGuest:
    """What the destination needs of the source's configuration (paths are its own)."""
    c = guest.config
    return control.QemuGuest(control.QemuSpec(ram_mb=c.ram_mb, smp=c.smp, append=c.append,
                                              name=c.name))


def initial_bandwidth(session: TransportSession, options: QemuMigrationOptions) -> float:
    """QEMU's max-bandwidth before the stream's delivery rate is known."""
    if options.initial_bandwidth_Bps is not None:
        return options.initial_bandwidth_Bps
    cap_bps = session.session.config.rate_cap_bps
    return cap_bps / 8 if cap_bps else INITIAL_BANDWIDTH_Bps


async def _send_ram_digests(session: TransportSession, source: QemuGuest,
                            emit: Callable[..., None]) -> ramcheck.Digests:
    """Hash the paused source's RAM and send the digests to the destination (on the
    device-state channel, ahead of the memory stream's last bytes)."""
    digests = await asyncio.to_thread(ramcheck.ram_digests, source.mem_path)
    emit(BlackoutStep(step="source ram hashed"))
    for message in ramcheck.encode_digest_messages(digests):
        await session.send(Channel.DEVICE_STATE, message)
    return digests


def controller_config(options: QemuMigrationOptions) -> ControllerConfig:
    """The convergence controller's settings for a QEMU guest (what its forecast models too):
    the link share QEMU's sampled dirty rate allows (:data:`QEMU_ALPHA`), the cgroup's
    strongest throttle, or none with SDPS off."""
    return ControllerConfig(budget_s=options.downtime_limit_ms / 1000,
                            timeout_s=options.timeout_s, alpha=QEMU_ALPHA,
                            max_throttle=QEMU_MAX_THROTTLE if options.sdps else 0.0,
                            window_s=1.0)


class QemuSource(SourceBackend):
    """A running QEMU's source: its own migration stream tunnelled over the session
    (SourceTunnel, max-bandwidth following the delivery rate), its disk mirrored
    (SourceDiskMirror), its RAM checked against the destination's at READY (ramcheck)."""

    def __init__(self, source: QemuGuest, workdir: Path,
                 options: QemuMigrationOptions) -> None:
        self.source, self.workdir, self.options = source, workdir, options
        self.result: QemuSourceResult = QemuSourceResult("", 0)
        self.size = disk_size(source) if options.disk else 0
        self.mirror: SourceDiskMirror | None = None
        self.tunnel: SourceTunnel | None = None
        self.governor: BandwidthGovernor | None = None
        self.sdps: QemuSdps | None = None
        self.migrating = False  #: QEMU's migrate was issued
        self._listening = contextlib.ExitStack()  #: QEMU's MIGRATION events, while moving
        self._events: EventListener | None = None
        self._tasks: list[asyncio.Future[Any]] = []  #: governor, throttle, RAM hashing
        self._hashing: asyncio.Future[ramcheck.Digests] | None = None
        self._sdps_task: asyncio.Task[None] | None = None

    def negotiate(self, migration: str, epoch: int, token: str) -> control.Negotiate:
        return control.Negotiate(migration, epoch, guest_description(self.source), self.size,
                                 self.source.config.ram_mb << 20, token)

    async def start(self, session: TransportSession, emit: Emit) -> None:
        source, options, result = self.source, self.options, self.result
        self._session, self._emit = session, emit
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.size:
            self.mirror = SourceDiskMirror(session, source, workdir=self.workdir,
                                           epoch=result.epoch, bound=options.mirror_bound)
            await self.mirror.start(options.timeout_s)
            result.mirror_ready_at = time.monotonic()
            emit(PhaseChanged(note="disk mirror ready"))
        # no return path: xmig learns that the destination loaded the stream from READY,
        # and QEMU 7.2's return-path thread closes the stream's socket under the migration
        # thread when the stream breaks (SourceTunnel.sever); pause-before-switchover
        # does not need it
        await set_capabilities(source, events=True, return_path=False,
                               pause_before_switchover=True)
        srtt = session.stats().get("srtt_s")
        split = split_budget(options.downtime_limit_ms, ram_bytes=source.config.ram_mb << 20,
                             srtt_s=float(srtt) if isinstance(srtt, int | float) else None)
        await source.execute("migrate-set-parameters", {"downtime-limit": split.qemu_limit_ms})
        emit(DowntimeBudget(budget_ms=split.budget_ms, qemu_limit_ms=split.qemu_limit_ms,
                            reserve_ms=split.reserve_ms, fits=split.fits))
        tunnel = SourceTunnel(session, self.workdir / f"{result.migration}.mig",
                              chunk=options.chunk)
        self.tunnel = tunnel
        await tunnel.start()
        governor = BandwidthGovernor(source, session, period_s=options.bandwidth_period_s,
                                     initial_Bps=initial_bandwidth(session, options),
                                     sent=lambda: tunnel.sent.bytes)
        self.governor = governor
        await governor.apply()
        self._events = self._listening.enter_context(source.listener("MIGRATION"))
        await source.execute("migrate", {"uri": tunnel.uri})
        self.migrating = True

        def report() -> None:
            emit(QemuProgress(stream=tunnel.stats(), max_bandwidth=governor.current,
                              session=session.stats()))

        self._tasks.append(asyncio.create_task(governor.run(report)))
        if options.sdps:
            self.sdps = QemuSdps(source, session, cfs_period_us=options.sdps_period_us,
                                 controller=self._controller(session))
            await self.sdps.start()
            self._sdps_task = asyncio.create_task(self.sdps.run())
            self._tasks.append(self._sdps_task)

    def _controller(self, session: TransportSession) -> JointThrottle:
        """The convergence controller (:mod:`xmig.convergence`): the vCPUs' CPU quota and
        the pace of the mirror's acknowledgements (QEMU's write-blocking mirror waits for
        them), from memory and disk together."""
        config = controller_config(self.options)
        return for_session(config, session, self.mirror.sender if self.mirror else None)

    async def converge(self) -> None:
        """Until QEMU stopped the vCPUs (pause-before-switchover): its pre-copy reached its
        downtime limit. NotConverging past ``timeout_s``, or at once when the convergence
        controller (SDPS on) finds that no allowed throttle can fit the budget."""
        assert self._events is not None
        switchover = asyncio.ensure_future(
            wait_migration(self._events, self.source, {"pre-switchover"}, 1e9))
        watched = [switchover] + ([self._sdps_task] if self._sdps_task else [])
        try:
            async with asyncio.timeout(self.options.timeout_s):
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            if switchover not in done:  # the controller's verdict
                assert self._sdps_task is not None
                self._sdps_task.result()
            await switchover
        except TimeoutError:
            raise NotConverging(f"QEMU's pre-copy did not reach its downtime limit within "
                                f"{self.options.timeout_s:g} s ("
                                f"{await _precopy_figures(self.source, self.sdps)})") from None
        finally:
            switchover.cancel()

    def _release_throttle(self) -> None:
        for task in self._tasks[:2]:  # the governor and the throttle, not the hashing
            task.cancel()
        if self.sdps is not None:
            self.result.sdps_max_throttle = self.sdps.max_throttle
            self.sdps.release()  # at switchover, always

    def pause_effects(self) -> Effects:
        async def release_throttle() -> None:
            self._release_throttle()

        # QEMU paused the vCPUs itself (pre-switchover)
        return Effects(release_throttle=release_throttle, pause_guest=nothing)

    async def seal(self) -> Sealed:
        if self.mirror is not None:
            self.result.disk_seq = await self.mirror.finish(self.options.reply_timeout_s)
            self._emit(BlackoutStep(step="disk mirror sealed", disk_seq=self.result.disk_seq))
        return Sealed(disk_seq=self.result.disk_seq)

    async def after_final(self) -> None:
        await self.source.execute("migrate-continue", {"state": "pre-switchover"})
        self._emit(BlackoutStep(step="migrate-continue"))
        # the vCPUs are stopped since pre-switchover: the source's RAM is final. Hashed
        # while the last pass crosses (not before migrate-continue: the hashing thread
        # would slow this loop's QMP); the digests go ahead of its last bytes
        self._hashing = asyncio.ensure_future(
            _send_ram_digests(self._session, self.source, self._emit))
        self._tasks.append(self._hashing)

    async def transferred(self, peer: Any) -> None:
        """READY (the destination loaded everything) and the source's completion (its last
        bytes written into the tunnel) may come in either order: wait for the completion,
        READY (or an ABORT) first or not."""
        assert self._events is not None
        timeout = self.options.reply_timeout_s
        completing = wait_migration(self._events, self.source, {"completed"}, timeout)
        if not await completed_or_message(completing, peer):
            reply = peer.result()
            if not isinstance(reply, control.Ready):
                raise control.unexpected(reply, "ready", peer="destination")
            await wait_migration(self._events, self.source, {"completed"}, timeout)
        self.result.completed_at = time.monotonic()
        self._emit(BlackoutStep(step="source completed"))

    async def check_ready(self, ready: control.Ready) -> GoRecord:
        """The stream's length and the RAM's digests; the chunks QEMU's stream left stale
        are sent again (the destination writes them before it runs: GO waits for them) and
        journaled with GO (settling a destination left in doubt sends them again)."""
        assert self.tunnel is not None and self._hashing is not None
        sent = self.tunnel.sent.bytes
        if ready.digests.get("stream_bytes") != str(sent):
            raise MigrationError(f"the destination took {ready.digests.get('stream_bytes')} "
                                 f"bytes of the stream, the source sent {sent}")
        stale = ramcheck.decode_chunks(ready.digests.get("ram_stale", ""),
                                       len(await self._hashing))
        self.result.ram_chunks_repaired = len(stale)
        fixups = await asyncio.to_thread(ramcheck.encode_fixups, self.source.mem_path, stale)
        for message in fixups:
            await self._session.send(Channel.DEVICE_STATE, message)
        self._emit(BlackoutStep(step="ram checked", repaired_chunks=len(stale)))
        return GoRecord({"ram_repair": [int(c) for c in stale]})

    async def after_go(self) -> None:
        self._listening.close()

    async def finish(self) -> None:
        """The source QEMU stays paused (postmigrate); its figures taken, the tunnel and
        the mirror closed."""
        result = self.result
        with contextlib.suppress(XmigError):
            result.qemu_info = dict(await self.source.execute("query-migrate"))
        if self.governor is not None:
            result.bandwidth = list(self.governor.history)
        if self.tunnel is not None:
            result.stream = self.tunnel.stats()
            await self.tunnel.close()
        if self.mirror is not None:
            result.disk = self.mirror.progress()
            await self.mirror.close()

    async def interrupted(self) -> None:
        self._release_throttle()
        for task in self._tasks:
            task.cancel()
        self._listening.close()
        if self.governor is not None:
            self.result.bandwidth = list(self.governor.history)
        if self.mirror is not None:
            self.result.disk = self.mirror.progress()

    def abort_effects(self) -> Effects:
        """Before GO: end the disk mirror, then QEMU's migration, make sure the source runs
        (the engine journals ABORT first and tells the destination last).

        The mirror ends first (:meth:`SourceDiskMirror.close`): its sender stopped (every guest
        write acknowledged at once), the guest's vCPUs stopped (QMP ``stop`` drains the guest's
        disk requests) around the job's force-cancel, the NBD node deleted once the job has
        ended, the vCPUs continued; then the migration (:func:`cancel_migration`), then
        ``cont`` if QEMU left the guest paused.

        Found: the source QEMU's heap corruption with the destination killed in pre-copy
        (``malloc_consolidate(): invalid chunk size``, or SIGSEGV, at the next QMP command's
        ``qdict_new``; 3 of 20 loaded runs) came from QEMU 7.2's mirror job, not from the
        migration: a force-cancelled job frees its ``in_flight_bitmap`` before it drains the
        guest's write-blocking writes, and one in flight then clears bits in it (ASan build of
        the same source: ``heap-use-after-free`` in ``bitmap_clear`` from
        ``active_write_settle``, freed by ``mirror_run``, in 3 of 12 loaded runs). The cores
        agree: one bit cleared in a freed 32-byte chunk, QEMU dead before the stream was cut;
        none without a disk. With the vCPUs stopped around the cancel: 0 of 12 under ASan,
        20 of 20 with QEMU 7.2 (the earlier theory, block migration's cleanup draining a
        pending mirror write, did not hold)."""
        source, tunnel, mirror = self.source, self.tunnel, self.mirror

        async def release_throttle() -> None:
            self._release_throttle()

        async def stop_mirror() -> None:
            if mirror is not None:
                await mirror.close()

        async def stop_transfer() -> None:
            with contextlib.suppress(XmigError):
                if self.migrating:
                    await cancel_migration(source, None if tunnel is None else tunnel.sever)
                await resume_guest()  # QEMU may have paused it before the machine knew
            if tunnel is not None:
                await tunnel.close()

        async def resume_guest() -> None:
            # postmigrate: its QEMU completed (its last bytes left) before the destination
            # said READY; cont takes its disk back and runs it
            with contextlib.suppress(XmigError):
                if await source.status() in ("paused", "finish-migrate", "postmigrate"):
                    await source.cont()

        return Effects(release_throttle=release_throttle, stop_mirror=stop_mirror,
                       stop_transfer=stop_transfer, resume_guest=resume_guest)


async def _precopy_figures(source: QemuGuest, sdps: QemuSdps | None) -> str:
    """What pre-copy stood at, for an operator told it does not converge."""
    try:
        info: Any = await source.execute("query-migrate")
    except XmigError as err:
        return f"query-migrate: {err}"
    ram = info.get("ram", {})
    figures = [f"remaining {ram.get('remaining', 0) / MiB:.1f} MiB",
               f"pass {ram.get('dirty-sync-count', '?')}",
               f"{ram.get('mbps', 0):.0f} Mbit/s",
               f"dirty {ram.get('dirty-pages-rate', 0) * 4096 / MiB:.1f} MiB/s",
               f"QEMU's expected downtime {info.get('expected-downtime', '?')} ms"]
    if sdps is not None:
        figures.append(f"SDPS throttle {sdps.cgroup.throttle:.3f}")
        if sdps.samples:
            figures.append(f"measured dirty rate {sdps.samples[-1]['dirty_Bps'] / MiB:.1f} "
                           "MiB/s")
    return ", ".join(figures)


