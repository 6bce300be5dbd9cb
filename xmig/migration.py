"""The source agent's orchestrator: one migration of a reference guest, phase by phase.

    NEGOTIATE  -> the destination prepares a paused guest and an empty disk image
    BROWNOUT   -> bulk disk copy + mirror (DiskSender) and pre-copy rounds (MemorySender)
    BLACKOUT   -> pause; last pages; mirror sealed (all queued writes sent); device state;
                  FINAL (the destination applies up to FINAL's disk seq before READY)
    PREPARE    -> wait for READY; journal GO; send GO; wait for RESUMED

The phases and the commit rules live in :mod:`xmig.switchover` (sans-IO); this module does
the I/O. Before GO, any failure aborts: the throttle is released, mirroring stops, the
source guest is resumed if it was paused, ABORT is journaled and sent, and
:class:`~xmig.errors.MigrationAborted` is raised with the cause. After GO the source never
resumes its guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any

import xxhash

from xmig import control, guestctl
from xmig.aborting import blackout_deadline, run_abort, tell_abort
from xmig.commit import Effects, execute, nothing
from xmig.errors import (
    DeadlineExceeded,
    MigrationError,
    ProtocolError,
    TransportError,
    XmigError,
)
from xmig.guest.sim import SimConfig, SimGuest
from xmig.journal import Journal
from xmig.memory.engine import MemorySender, Progress, SenderConfig
from xmig.memory.precopy import PlannerConfig
from xmig.memory.sdps import AutoConverge
from xmig.storage.engine import DiskSender
from xmig.storage.nbd import NbdServer
from xmig.storage.raw import RawFileBackend
from xmig.switchover import SourceMachine, SourcePhase, Step
from xmig.transport import Channel, TransportSession
from xmig.transport.driver import single_errors

MiB = 1 << 20
FLUSH_PERIOD_S = 1.0  #: the source image is flushed this often during the brownout


@dataclass(frozen=True)
class MigrationOptions:
    """What an operator can set (``xmig migrate`` flags)."""

    max_downtime_s: float = 0.3
    timeout_s: float = 300.0  #: pre-copy that has not converged by then is abandoned
    sdps: str = "on"  #: "on" (xmig's SDPS), "off", or "autoconverge" (QEMU's, for comparison)
    mirror_bound: int = 32 * MiB  #: bytes of guest writes queued before acks are delayed
    reply_timeout_s: float = 60.0  #: for each answer of the destination
    blackout_timeout_s: float = 10.0
    """From the guest's pause to GO journaled, as a whole: past it the migration aborts
    (:class:`~xmig.errors.DeadlineExceeded`) and the guest resumes here."""
    verify: bool = True
    """Both sides keep chunk digests of memory and disk current through the pre-copy
    (:mod:`xmig.digest`) and compare them at READY; GO is refused on a mismatch. The
    blackout only re-reads what the last round changed; off, only the device state is
    compared."""


@dataclass
class SourceResult:
    """What the source saw; :mod:`xmig.report` turns it into the final report."""

    migration: str
    epoch: int
    status: str = "running"
    error: str | None = None
    started: float = 0.0
    paused_at: float = 0.0
    committed_at: float = 0.0
    rounds: int = 0
    sdps_max_throttle: float = 0.0
    memory_digest: str = ""
    device_digest: str = ""
    disk_digest: str = ""
    ready_digests: dict[str, str] = field(default_factory=dict)
    resumed_at: float = 0.0
    timeline: list[dict[str, Any]] = field(default_factory=list)
    memory_progress: Progress | None = None


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
    reply = await _recv_control(session, timeout)
    if isinstance(reply, control.Refused):
        raise reply.as_error()
    expected = control.Resumed if isinstance(decision, control.Go) else control.Discarded
    if not isinstance(reply, expected):
        raise ProtocolError(f"expected {expected.__struct_config__.tag}, got {reply.type}")
    return decision


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


async def _recv_control(session: TransportSession, timeout: float) -> control.Message:
    try:
        async with asyncio.timeout(timeout):
            return control.decode(await session.recv(Channel.CONTROL))
    except TimeoutError as err:
        raise DeadlineExceeded(f"no word from the destination within {timeout:g} s") from err


async def migrate(
    session: TransportSession,
    guest: SimGuest,
    disk: RawFileBackend,
    nbd: NbdServer,
    *,
    migration: str,
    journal: Journal,
    options: MigrationOptions,
    on_progress: Callable[[dict[str, Any]], None] = lambda event: None,
) -> SourceResult:
    """Move ``guest`` (its RAM, and its disk served to it by ``nbd`` from ``disk``) to the
    destination agent at the other end of ``session``."""
    epoch = journal.next_epoch()
    machine = SourceMachine(epoch)
    result = SourceResult(migration, epoch, started=time.monotonic())
    token = control.new_token()
    journal.append("START", migration, epoch, token=token)
    sender: DiskSender | None = None
    memory: MemorySender | None = None

    def emit(kind: str, **fields: Any) -> None:
        event = {"event": kind, "phase": machine.phase.value,
                 "t": round(time.monotonic() - result.started, 4), **fields}
        result.timeline.append(event)
        on_progress(event)

    try:
        await session.send(Channel.CONTROL, control.Negotiate(
            migration, epoch, control.SimGuest(sim_spec(guest.config), options.verify),
            disk.size, guest.config.ram_bytes, token).encode())
        reply = await _recv_control(session, options.reply_timeout_s)
        if isinstance(reply, control.Refused):
            raise reply.as_error()
        if not isinstance(reply, control.Prepared):
            raise ProtocolError(f"expected prepared, got {reply.type}")
        machine.negotiated()
        emit("phase")

        sender = DiskSender(session, disk, epoch=epoch, bound=options.mirror_bound,
                            verify=options.verify)
        nbd.hook = sender  # from now on every guest write is mirrored
        await sender.start()
        controller: AutoConverge | bool = (
            AutoConverge() if options.sdps == "autoconverge" else options.sdps == "on")
        planner = PlannerConfig(downtime_budget=options.max_downtime_s,
                                timeout=options.timeout_s, sdps=options.sdps != "off")

        def memory_progress(p: Progress) -> None:
            result.memory_progress = p
            if sender is not None and p.round >= 1 and p.delivery_rate > 0:
                # shrink the mirror's bound as switchover nears: draining it must fit
                fit = int(p.delivery_rate * options.max_downtime_s / 2)
                sender.set_bound(max(MiB, min(options.mirror_bound, fit)))
            result.sdps_max_throttle = max(result.sdps_max_throttle, p.throttle)
            d = asdict(sender.progress()) if sender else None
            emit("progress", round=p.round, pages_left=p.pages_left,
                 predicted_downtime_ms=round(p.predicted_downtime * 1000, 1),
                 decision=p.decision.value, throttle=round(p.throttle, 3),
                 dirty_rate_Bps=p.dirty_rate, memory_rate_Bps=p.delivery_rate,
                 wire_ratio=round(p.wire_ratio, 4),
                 disk=d, session=session.stats())

        memory = MemorySender(session, guest.memory, sdps=controller,
                              config=SenderConfig(planner=planner), on_progress=memory_progress,
                              mirror_queue=lambda: sender.progress().pending_bytes
                              if sender else 0, verify=options.verify)

        async def brownout() -> None:
            assert memory is not None and sender is not None
            while True:
                await memory.precopy()
                if sender.progress().bulk_done:
                    break
                # the memory would fit, the disk copy is not done: draining it is not for
                # the blackout. Wait for it, then more rounds for what was dirtied meanwhile
                emit("progress_note", note="memory fits; waiting for the disk bulk copy")
                await sender.wait_bulk()
            if options.verify:
                # the disk's digests current before the pause (memory's are kept current by
                # the rounds), so the blackout re-reads only what is written after this
                await sender.digests_current()
                await memory.precopy()

        await _watched(brownout(), session, sender, disk)

        # -- blackout: from here every step counts towards the downtime -----------------
        async def release_throttle() -> None:
            assert memory is not None
            memory.release()

        async def pause_guest() -> None:
            # guest control blocks until the vCPU reaches a safe point, which may wait on a
            # disk write our own NBD server must answer: never call it on the event loop
            await guestctl.call(guest.pause)

        async def blackout() -> Step:
            """Pause to READY checked and the image flushed: bounded as a whole. The step
            that commits (journal GO, send it)."""
            assert memory is not None and sender is not None
            await execute(machine.pause(), Effects(release_throttle=release_throttle,
                                                   pause_guest=pause_guest))
            result.paused_at = time.monotonic()
            # the guest's last writes reach the image's disk while FINAL and READY cross
            flushing = asyncio.ensure_future(asyncio.to_thread(disk.flush))
            # awaited before GO; on an abort before that its outcome must be retrieved
            flushing.add_done_callback(lambda f: f.cancelled() or f.exception())
            emit("phase", note="guest paused")
            final = await memory.final_round(digest=options.verify)
            emit("blackout", step="final pages queued", pages=final.final_pages)
            result.rounds = final.rounds
            result.memory_digest = final.digest.hex() if final.digest else ""
            disk_seq = await sender.seal()
            emit("blackout", step="mirror sealed", disk_seq=disk_seq)
            # the source's disk digest is read while the destination applies (compared
            # only when READY comes, before GO), not in front of FINAL
            digesting = asyncio.ensure_future(sender.digest()) if options.verify else None
            state = await guestctl.call(guest.device_state)
            result.device_digest = xxhash.xxh3_64_hexdigest(state)
            await session.send(Channel.DEVICE_STATE, state)
            await session.send(Channel.CONTROL, control.Final(
                migration, epoch, disk_seq=disk_seq,
                device_state_bytes=len(state)).encode())
            machine.final_sent()
            emit("phase", note="final state sent")

            reply = await _recv_control(session, options.reply_timeout_s)
            if isinstance(reply, control.Abort):
                raise MigrationError(f"destination aborted: {reply.reason}")
            if not isinstance(reply, control.Ready):
                raise ProtocolError(f"expected ready, got {reply.type}")
            result.ready_digests = dict(reply.digests)
            emit("blackout", step="ready received")
            if digesting is not None:
                result.disk_digest = await digesting
            if options.verify and reply.digests.get("memory") != result.memory_digest:
                raise MigrationError("destination memory digest differs from the source's")
            if reply.digests.get("device") not in (None, result.device_digest):
                raise MigrationError("destination device-state digest differs")
            if options.verify and reply.digests.get("disk") != result.disk_digest:
                raise MigrationError("destination disk digest differs from the source's")
            await flushing
            return machine.ready(reply.epoch)
        async with blackout_deadline(
                options.blackout_timeout_s, armed=True,
                where=lambda: f"phase {machine.phase.value}: aborted, the guest resumes here"):
            commit = await blackout()

        async def send_go() -> None:
            await session.send(Channel.CONTROL, control.Go(migration, epoch, token).encode())

        # GO journaled, then sent: the source guest never runs again, whatever happens next
        await execute(commit, Effects(
            journal=lambda kind: journal.append(kind, migration, epoch), send_go=send_go))
        result.committed_at = time.monotonic()
        emit("phase", note="GO sent")
    except (XmigError, OSError, asyncio.CancelledError) as err:
        if not machine.may_resume_source:
            # GO is journaled: the copy stays paused until the destination's word (I1)
            result.status, result.error = "in-doubt", f"{type(err).__name__}: {err}"
            if isinstance(err, asyncio.CancelledError):
                raise
            machine.cut_off()
            emit("phase", note=f"in doubt: GO journaled, sending it failed: {result.error}")
            return result
        # cancelled (source agent stopped, Ctrl-C, an outer deadline) aborts like a
        # failure, shielded from a second cancellation, then the cancellation goes on
        def aborted(error: str) -> None:
            result.status, result.error = "aborted", error
            emit("phase", note=f"aborted: {error}")

        await run_abort(_abort(machine, session, guest, memory, sender, nbd, journal,
                               migration, epoch, token, err), err, aborted)

    # -- after GO: the destination confirms it runs the guest; until then the copy stays --
    nbd.hook = None
    await sender.stop()
    try:
        confirmed: control.Message | None = await _recv_control(session,
                                                                options.reply_timeout_s)
        why = "" if confirmed is None else f"got {confirmed.type}"
    except (TransportError, TimeoutError, ProtocolError) as err:
        confirmed, why = None, f"{type(err).__name__}: {err}"
    if isinstance(confirmed, control.Resumed):
        result.resumed_at = confirmed.at
        machine.resumed()
        result.status = "done"
        emit("phase", note="destination running")
        return result
    machine.cut_off()
    result.status, result.error = "in-doubt", f"no RESUMED after GO: {why}"
    emit("phase", note="in doubt: GO journaled, the destination has not confirmed")
    return result


async def _watched(work: Coroutine[Any, Any, None], session: TransportSession,
                   sender: DiskSender, disk: RawFileBackend) -> None:
    """Run ``work``; a session that fails or a disk copy that breaks ends it at once with
    their typed error (pre-copy alone would only notice at its timeout). Meanwhile the
    source image is flushed every second, so the fsync of the GO journal record (ext4
    commits the image's pending data with it) finds little to write in the blackout."""
    async def watch_session() -> None:
        await session.wait_until(lambda: False)

    async def flush_now_and_then() -> None:
        while True:
            await asyncio.to_thread(disk.flush)
            await asyncio.sleep(FLUSH_PERIOD_S)  # a maintenance period, not a wait

    with single_errors():
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(work)
            watchers = [tg.create_task(watch_session()), tg.create_task(sender.watch()),
                        tg.create_task(flush_now_and_then())]
            task.add_done_callback(lambda _: [w.cancel() for w in watchers])


async def _abort(machine: SourceMachine, session: TransportSession, guest: SimGuest,
                 memory: MemorySender | None, sender: DiskSender | None, nbd: NbdServer,
                 journal: Journal, migration: str, epoch: int, token: str,
                 err: BaseException) -> bool:
    """Before GO: release everything; the source guest runs as if nothing happened.
    Whether the destination may hold a paused copy that has not heard ABORT (it may have
    voted READY: the guest was paused here)."""
    was_paused = machine.phase in (SourcePhase.BLACKOUT, SourcePhase.PREPARE)
    told = True

    async def release_throttle() -> None:
        if memory is not None:
            memory.release()

    async def stop_mirror() -> None:
        nbd.hook = None
        if sender is not None:
            with contextlib.suppress(XmigError):
                await sender.stop()

    async def resume_guest() -> None:
        await guestctl.call(guest.resume)

    async def send_abort() -> None:
        nonlocal told
        told = await tell_abort(session, control.Abort(
            migration, epoch, control.error_text(err), token))

    # the memory transfer is this coroutine's own work, already ended by the error
    await execute(machine.abort(str(err)), Effects(
        journal=lambda kind: journal.append(kind, migration, epoch,
                                            reason=f"{type(err).__name__}: {err}"),
        release_throttle=release_throttle, stop_mirror=stop_mirror, stop_transfer=nothing,
        resume_guest=resume_guest, send_abort=send_abort))
    return was_paused and not told
