"""The reference guest's source backend (:class:`SimSource`), driven by the one engine
(:func:`xmig.orchestrator.source.run_source`), and :func:`migrate`, which runs it.

    NEGOTIATE  -> the destination prepares a paused guest and an empty disk image
    BROWNOUT   -> bulk disk copy + mirror (DiskSender) and pre-copy rounds (MemorySender)
    BLACKOUT   -> pause; last pages; mirror sealed (all queued writes sent); device state;
                  FINAL (the destination applies up to FINAL's disk seq before READY)
    PREPARE    -> READY's digests compared with the source's; the engine commits

Before GO the engine aborts with :meth:`SimSource.abort_effects`: the throttle released,
mirroring stopped, the source guest resumed if it was paused.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field

import xxhash

from xmig import guestctl
from xmig.convergence import ControllerConfig
from xmig.convergence.joint import for_session
from xmig.convergence.penalty import PenaltyConfig, PenaltyCost, PenaltyGovernor
from xmig.errors import MigrationError, XmigError
from xmig.events import BlackoutStep, ProgressNote, SimProgress
from xmig.guest.backend import Emit, GoRecord, Sealed, SourceBackend, SourceResult
from xmig.guest.sim import SimConfig, SimGuest
from xmig.memory.engine import MemorySender, Progress, SenderConfig
from xmig.memory.precopy import PlannerConfig
from xmig.memory.sdps import AutoConverge, ThrottleController
from xmig.protocol import control
from xmig.protocol.commit import Effects, nothing
from xmig.storage.engine import DiskSender
from xmig.storage.nbd import NbdServer
from xmig.storage.raw import RawFileBackend
from xmig.transport import Channel, TransportSession
from xmig.transport.driver import single_errors

MiB = 1 << 20
FLUSH_PERIOD_S = 1.0  #: the source image is flushed this often during the brownout
PENALTY_PERIOD_S = 0.25  #: --max-penalty: the guest's progress is read this often


@dataclass(frozen=True)
class MigrationOptions:
    """What an operator can set (``xmig migrate`` flags)."""

    max_downtime_s: float = 0.3
    timeout_s: float = 300.0  #: pre-copy that has not converged by then is abandoned
    sdps: str = "on"  #: "on" (xmig's SDPS), "off", or "autoconverge" (QEMU's, for comparison)
    mirror_bound: int = 32 * MiB
    """The hard cap on guest writes queued for the destination; within it, with SDPS on,
    the convergence controller paces their acknowledgements (:mod:`xmig.convergence`)."""
    reply_timeout_s: float = 60.0  #: for each answer of the destination
    blackout_timeout_s: float = 10.0
    """From the guest's pause to GO journaled, as a whole: past it the migration aborts
    (:class:`~xmig.errors.DeadlineExceeded`) and the guest resumes here."""
    verify: bool = True
    """Both sides keep chunk digests of memory and disk current through the pre-copy
    (:mod:`xmig.digest`) and compare them at READY; GO is refused on a mismatch. The
    blackout only re-reads what the last round changed; off, only the device state is
    compared."""
    max_penalty: float | None = None
    """The guest's progress may fall at most this fraction below its pace at the start: the
    one-time copy is paced to keep it, and SDPS's throttle is capped at it
    (:mod:`xmig.convergence.penalty`); None: no bound."""


@dataclass
class SimSourceResult(SourceResult):
    """What the reference guest's source saw; :mod:`xmig.orchestrator.report` turns it into the
    report."""

    rounds: int = 0
    memory_digest: str = ""
    device_digest: str = ""
    disk_digest: str = ""
    ready_digests: dict[str, str] = field(default_factory=dict)
    memory_progress: Progress | None = None
    max_ack_delay_s: float = 0.0  #: the guest's mirrored disk writes, at the seal
    p99_ack_delay_s: float = 0.0
    penalty_cost: PenaltyCost | None = None  #: what --max-penalty cost (None: not set)


def controller_config(options: MigrationOptions) -> ControllerConfig:
    """The convergence controller's settings for a reference guest (what its forecast
    models too): the throttle capped at ``--max-penalty``, or none with SDPS off."""
    throttle = 0.99 if options.max_penalty is None else options.max_penalty
    return ControllerConfig(budget_s=options.max_downtime_s, timeout_s=options.timeout_s,
                            max_throttle=0.0 if options.sdps == "off" else throttle)


def sim_spec(config: SimConfig) -> control.SimSpec:
    """What the destination is told of a reference guest: its definition, none of this
    host's files, addresses or nice level."""
    return control.SimSpec(
        ram_bytes=config.ram_bytes, disk_bytes=config.disk_bytes,
        workload=config.workload,  # type: ignore[arg-type]  # checked by SimConfig
        rate_Bps=None if math.isinf(config.rate_Bps) else config.rate_Bps,
        hotset_bytes=config.hotset_bytes, seed=config.seed,
        zero_fraction=config.zero_fraction, text_fraction=config.text_fraction,
        write_size=config.write_size,
        disk_rate_Bps=None if math.isinf(config.disk_rate_Bps) else config.disk_rate_Bps,
        table_bytes=config.table_bytes, oltp_keys=config.oltp_keys,
        disk_queue_depth=config.disk_queue_depth, udp=config.udp_addr is not None)


class SimSource(SourceBackend):
    """The reference guest's source: the page engine (MemorySender) moves its RAM, the
    disk engine (DiskSender) its disk, copied in bulk and mirrored from its NBD server."""

    def __init__(self, guest: SimGuest, disk: RawFileBackend, nbd: NbdServer,
                 options: MigrationOptions) -> None:
        self.guest, self.disk, self.nbd, self.options = guest, disk, nbd, options
        self.result: SimSourceResult = SimSourceResult("", 0)
        self.sender: DiskSender | None = None
        self.memory: MemorySender | None = None
        self._flushing: asyncio.Future[None] | None = None
        self._digesting: asyncio.Future[str] | None = None

    def negotiate(self, migration: str, epoch: int, token: str) -> control.Negotiate:
        return control.Negotiate(
            migration, epoch, control.SimGuest(sim_spec(self.guest.config), self.options.verify),
            self.disk.size, self.guest.config.ram_bytes, token)

    async def start(self, session: TransportSession, emit: Emit) -> None:
        options, result = self.options, self.result
        sender = DiskSender(session, self.disk, epoch=result.epoch, bound=options.mirror_bound,
                            verify=options.verify)
        self.sender = sender
        self.nbd.hook = sender  # from now on every guest write is mirrored
        await sender.start()
        controller = self._controller(session, sender)
        planner = PlannerConfig(downtime_budget=options.max_downtime_s,
                                timeout=options.timeout_s, sdps=options.sdps != "off")

        def memory_progress(p: Progress) -> None:
            result.memory_progress = p
            result.sdps_max_throttle = max(result.sdps_max_throttle, p.throttle)
            emit(SimProgress(
                round=p.round, pages_left=p.pages_left,
                predicted_downtime_ms=round(p.predicted_downtime * 1000, 1),
                decision=p.decision.value, throttle=round(p.throttle, 3),
                dirty_rate_Bps=p.dirty_rate, memory_rate_Bps=p.delivery_rate,
                wire_ratio=round(p.wire_ratio, 4), disk=asdict(sender.progress()),
                session=session.stats()))

        self.memory = MemorySender(
            session, self.guest.memory, sdps=controller,
            config=SenderConfig(planner=planner), on_progress=memory_progress,
            mirror_queue=lambda: sender.progress().pending_bytes, verify=options.verify)
        self._session, self._emit = session, emit

    def _controller(self, session: TransportSession, sender: DiskSender
                    ) -> ThrottleController | bool:
        """SDPS: on, the convergence controller (the vCPU throttle and the mirror's
        acknowledgement pace, from memory and disk together); autoconverge, QEMU's
        algorithm (memory only); off, none (the mirror's bound is the only cap)."""
        options = self.options
        if options.sdps != "on":
            return AutoConverge() if options.sdps == "autoconverge" else False
        return for_session(controller_config(options), session, sender)

    async def converge(self) -> None:
        bound, pace = self.options.max_penalty, self.guest.progress().rate
        if bound is None or pace <= 0:  # no bound, or no pace to keep
            await self._converge()
            return
        governor = PenaltyGovernor(PenaltyConfig(bound), baseline=pace)
        self.result.penalty_cost = governor.cost
        try:
            with single_errors():
                async with asyncio.TaskGroup() as tg:
                    governing = tg.create_task(self._govern(governor))
                    await self._converge()
                    governing.cancel()
        finally:
            self._session.set_rate_cap(None)  # the blackout is never paced

    async def _govern(self, governor: PenaltyGovernor) -> None:
        """Pace the one-time copy to keep the guest's progress within the bound."""
        assert self.sender is not None
        while True:
            await asyncio.sleep(PENALTY_PERIOD_S)  # a control period
            memory = self.result.memory_progress
            copying = not self.sender.progress().bulk_done or memory is None or memory.round == 0
            delivered = self._session.stats().get("delivery_rate_Bps")
            cap = governor.update(
                now=time.monotonic(), progress_rate=self.guest.progress().rate,
                delivered_Bps=float(delivered) if isinstance(delivered, int | float) else 0.0,
                copying=copying)
            self._session.set_rate_cap(None if cap is None else cap * 8)

    async def _converge(self) -> None:
        assert self.memory is not None and self.sender is not None
        while True:
            await self.memory.precopy()
            if self.sender.progress().bulk_done:
                break
            # the memory would fit, the disk copy is not done: draining it is not for
            # the blackout. Wait for it, then more rounds for what was dirtied meanwhile
            self._emit(ProgressNote(note="memory fits; waiting for the disk bulk copy"))
            await self.sender.wait_bulk()
        if self.options.verify:
            # the disk's digests current before the pause (memory's are kept current by
            # the rounds), so the blackout re-reads only what is written after this
            await self.sender.digests_current()
            await self.memory.precopy()

    async def watch(self) -> None:
        """The disk copy breaking ends the brownout; meanwhile the source image is flushed
        every second, so the fsync of the GO journal record (ext4 commits the image's
        pending data with it) finds little to write in the blackout."""
        assert self.sender is not None

        async def flush_now_and_then() -> None:
            while True:
                await asyncio.to_thread(self.disk.flush)
                await asyncio.sleep(FLUSH_PERIOD_S)  # a maintenance period, not a wait

        with single_errors():
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.sender.watch())
                tg.create_task(flush_now_and_then())

    def pause_effects(self) -> Effects:
        async def release_throttle() -> None:
            if self.memory is not None:
                self.memory.release()

        async def pause_guest() -> None:
            # guest control blocks until the vCPU reaches a safe point, which may wait on a
            # disk write our own NBD server must answer: never call it on the event loop
            await guestctl.call(self.guest.pause)

        return Effects(release_throttle=release_throttle, pause_guest=pause_guest)

    async def seal(self) -> Sealed:
        assert self.memory is not None and self.sender is not None
        emit, result, verify = self._emit, self.result, self.options.verify
        # the guest's last writes reach the image's disk while FINAL and READY cross
        self._flushing = asyncio.ensure_future(asyncio.to_thread(self.disk.flush))
        # awaited before GO; on an abort before that its outcome must be retrieved
        self._flushing.add_done_callback(lambda f: f.cancelled() or f.exception())
        final = await self.memory.final_round(digest=verify)
        emit(BlackoutStep(step="final pages queued", pages=final.final_pages))
        result.rounds = final.rounds
        result.memory_digest = final.digest.hex() if final.digest else ""
        disk_seq = await self.sender.seal()
        disk = self.sender.progress()
        result.max_ack_delay_s, result.p99_ack_delay_s = disk.ack_delay_max_s, disk.ack_delay_p99_s
        emit(BlackoutStep(step="mirror sealed", disk_seq=disk_seq))
        # the source's disk digest is read while the destination applies (compared only
        # when READY comes, before GO), not in front of FINAL
        if verify:
            self._digesting = asyncio.ensure_future(self.sender.digest())
            self._digesting.add_done_callback(lambda f: f.cancelled() or f.exception())
        state = await guestctl.call(self.guest.device_state)
        result.device_digest = xxhash.xxh3_64_hexdigest(state)
        await self._session.send(Channel.DEVICE_STATE, state)
        return Sealed(disk_seq=disk_seq, device_state_bytes=len(state))

    async def check_ready(self, ready: control.Ready) -> GoRecord:
        result, verify = self.result, self.options.verify
        result.ready_digests = dict(ready.digests)
        if self._digesting is not None:
            result.disk_digest = await self._digesting
        if verify and ready.digests.get("memory") != result.memory_digest:
            raise MigrationError("destination memory digest differs from the source's")
        if ready.digests.get("device") not in (None, result.device_digest):
            raise MigrationError("destination device-state digest differs")
        if verify and ready.digests.get("disk") != result.disk_digest:
            raise MigrationError("destination disk digest differs from the source's")
        assert self._flushing is not None
        await self._flushing
        return GoRecord()

    async def after_go(self) -> None:
        self.nbd.hook = None
        if self.sender is not None:
            await self.sender.stop()

    async def interrupted(self) -> None:
        for work in (self._digesting, self._flushing):
            if work is not None and not work.done():
                work.cancel()

    def abort_effects(self) -> Effects:
        async def stop_mirror() -> None:
            self.nbd.hook = None
            if self.sender is not None:
                with contextlib.suppress(XmigError):
                    await self.sender.stop()

        async def resume_guest() -> None:
            await guestctl.call(self.guest.resume)

        # the memory transfer is the engine's own coroutine, already ended by the error
        return dataclasses.replace(self.pause_effects(), pause_guest=None,
                                   stop_mirror=stop_mirror, stop_transfer=nothing,
                                   resume_guest=resume_guest)
