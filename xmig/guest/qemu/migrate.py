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

The commit rules are :mod:`xmig.switchover`'s (the same machines as the reference guest's):
the destination QEMU runs only on GO; the source writes GO to its journal before sending it,
and its QEMU, paused since ``pre-switchover``, is never continued after that. Before GO any
failure aborts: the disk mirror ended (its job cancelled with the vCPUs stopped,
:func:`_abort_source`), QEMU's stream cut, ``migrate_cancel`` only if it must
(:func:`cancel_migration`; QEMU resumes the source vCPUs itself if it had paused them;
``cont`` makes sure), ABORT journaled and sent; the destination quits its QEMU.

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener

from xmig import control
from xmig.aborting import blackout_deadline, run_abort, tell_abort
from xmig.commit import Effects, execute, nothing
from xmig.errors import (
    MigrationError,
    NotConverging,
    ProtocolError,
    QemuError,
    XmigError,
)
from xmig.guest.qemu import ramcheck
from xmig.guest.qemu.budget import split_budget
from xmig.guest.qemu.machine import QemuGuest
from xmig.guest.qemu.mirror import SourceDiskMirror, disk_size
from xmig.guest.qemu.stream import CHUNK, BandwidthGovernor, SourceTunnel
from xmig.guest.qemu.throttle import QemuSdps
from xmig.journal import Journal
from xmig.storage.engine import DEFAULT_BOUND
from xmig.switchover import SourceMachine, SourcePhase
from xmig.transport import Channel, TransportSession

BACKEND = "qemu"
FAILED_STATES = frozenset({"failed", "cancelled"})
LIVE_STATES = frozenset({"setup", "active", "pre-switchover", "device", "cancelling"})
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
class QemuSourceResult:
    migration: str
    epoch: int
    status: str = "running"
    error: str | None = None
    started: float = 0.0
    paused_at: float = 0.0  #: QEMU reported pre-switchover (it had stopped the vCPUs)
    completed_at: float = 0.0  #: QEMU reported completed
    committed_at: float = 0.0  #: GO sent
    resumed_at: float = 0.0  #: the destination's RESUMED (its monotonic clock)
    resumed_seen_at: float = 0.0  #: when RESUMED arrived here
    stream: dict[str, Any] = field(default_factory=dict)
    bandwidth: list[tuple[float, int]] = field(default_factory=list)
    qemu_info: dict[str, Any] = field(default_factory=dict)  #: query-migrate at the end
    ram_chunks_repaired: int = 0  #: RAM chunks QEMU's stream left stale (ramcheck)
    disk_seq: int = 0  #: the last mirrored write (FINAL)
    disk: dict[str, Any] = field(default_factory=dict)  #: mirror figures
    mirror_ready_at: float = 0.0
    sdps_max_throttle: float = 0.0
    timeline: list[dict[str, Any]] = field(default_factory=list)


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


async def recv_message(session: TransportSession, timeout: float) -> control.Message:
    async with asyncio.timeout(timeout):
        return control.decode(await session.recv(Channel.CONTROL))


async def wait_migration(events: EventListener, guest: QemuGuest, wanted: set[str],
                         timeout: float) -> str:
    """The next MIGRATION event whose status is in ``wanted``; QemuError when the migration
    failed or was cancelled, or nothing came within ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:  # a QEMU that died sends no event: look at it every second
                    event = await asyncio.wait_for(events.get(), 1.0)
                except TimeoutError:
                    if not guest.alive:
                        raise QemuError(f"{guest.config.name}: QEMU is gone (exit status "
                                        f"{guest.returncode}): {guest.log_tail()}") from None
                    continue
                data: Any = event.get("data", {})
                status = str(data.get("status", ""))
                if status in wanted:
                    return status
                if status in FAILED_STATES:
                    why = ""
                    with contextlib.suppress(XmigError):
                        info = await guest.execute("query-migrate")
                        why = f": {info.get('error-desc', '')}"
                    raise QemuError(f"{guest.config.name}: migration {status}{why}")
    except TimeoutError:
        raise QemuError(f"{guest.config.name}: no migration status {sorted(wanted)} within "
                        f"{timeout:g} s") from None


async def set_capabilities(guest: QemuGuest, **caps: bool) -> None:
    await guest.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": name.replace("_", "-"), "state": state} for name, state in caps.items()]})


async def completed_or_message(completing: Awaitable[str],
                                message: asyncio.Future[Any]) -> bool:
    """Wait until QEMU's migration completes (True) or a control message arrives first
    (False); the first error of either ends the wait."""
    task = asyncio.ensure_future(completing)
    try:
        waiting: list[asyncio.Future[Any]] = [task, message]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
            return True
        message.result()  # raises the session's error, if any
        return False
    finally:
        task.cancel()


async def _send_ram_digests(session: TransportSession, source: QemuGuest,
                            emit: Callable[..., None]) -> ramcheck.Digests:
    """Hash the paused source's RAM and send the digests to the destination (on the
    device-state channel, ahead of the memory stream's last bytes)."""
    digests = await asyncio.to_thread(ramcheck.ram_digests, source.mem_path)
    emit("blackout", step="source ram hashed")
    for message in ramcheck.encode_digest_messages(digests):
        await session.send(Channel.DEVICE_STATE, message)
    return digests


def unexpected(msg: control.Message, wanted: str) -> XmigError:
    if isinstance(msg, control.Abort):
        return MigrationError(f"peer aborted: {msg.reason}")
    return ProtocolError(f"expected {wanted}, got {msg.type}")


async def migrate_qemu(
    session: TransportSession,
    source: QemuGuest,
    *,
    migration: str,
    journal: Journal,
    workdir: Path,
    options: QemuMigrationOptions = QemuMigrationOptions(),
    on_progress: Callable[[dict[str, Any]], None] = lambda event: None,
) -> QemuSourceResult:
    """Move the running QEMU ``source`` to the destination agent at the other end of
    ``session``. Raises MigrationAborted (the source guest runs) on any failure before GO."""
    epoch = journal.next_epoch()
    machine = SourceMachine(epoch)
    result = QemuSourceResult(migration, epoch, started=time.monotonic())
    token = control.new_token()
    journal.append("START", migration, epoch, token=token)
    tunnel: SourceTunnel | None = None
    governing: asyncio.Task[None] | None = None
    governor: BandwidthGovernor | None = None
    hashing: asyncio.Future[ramcheck.Digests] | None = None
    migrating = False
    mirror: SourceDiskMirror | None = None
    sdps: QemuSdps | None = None
    throttling: asyncio.Task[None] | None = None
    ready_task: asyncio.Future[control.Message] | None = None
    size = disk_size(source) if options.disk else 0

    def emit(kind: str, **fields: Any) -> None:
        event = {"event": kind, "phase": machine.phase.value,
                 "t": round(time.monotonic() - result.started, 4), **fields}
        result.timeline.append(event)
        on_progress(event)

    try:
        await session.send(Channel.CONTROL, control.Negotiate(
            migration, epoch, guest_description(source), size,
            source.config.ram_mb << 20, token).encode())
        reply = await recv_message(session, options.reply_timeout_s)
        if isinstance(reply, control.Refused):
            raise reply.as_error()
        if not isinstance(reply, control.Prepared):
            raise ProtocolError(f"expected prepared, got {reply.type}")
        machine.negotiated()
        emit("phase")

        workdir.mkdir(parents=True, exist_ok=True)
        if size:
            mirror = SourceDiskMirror(session, source, workdir=workdir, epoch=epoch,
                                      bound=options.mirror_bound)
            await mirror.start(options.timeout_s)
            result.mirror_ready_at = time.monotonic()
            emit("phase", note="disk mirror ready")
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
        emit("downtime-budget", budget_ms=split.budget_ms, qemu_limit_ms=split.qemu_limit_ms,
             reserve_ms=split.reserve_ms, fits=split.fits)
        workdir.mkdir(parents=True, exist_ok=True)
        tunnel = SourceTunnel(session, workdir / f"{migration}.mig", chunk=options.chunk)
        await tunnel.start()
        governor = BandwidthGovernor(source, session, period_s=options.bandwidth_period_s,
                                     initial_Bps=initial_bandwidth(session, options),
                                     sent=lambda: tunnel.sent.bytes if tunnel else 0)
        await governor.apply()
        # the blackout's bound, from the pause (armed at pre-switchover) to GO
        async with blackout_deadline(
                options.blackout_timeout_s, armed=False,
                where=lambda: f"phase {machine.phase.value}: aborted, the source QEMU runs "
                "on") as arm_blackout:
            with source.listener("MIGRATION") as events:
                await source.execute("migrate", {"uri": tunnel.uri})
                migrating = True
                def report() -> None:
                    assert tunnel is not None and governor is not None
                    emit("progress", stream=tunnel.stats(), max_bandwidth=governor.current,
                         session=session.stats())

                governing = asyncio.create_task(governor.run(report))
                if options.sdps:
                    sdps = QemuSdps(source, session, cfs_period_us=options.sdps_period_us)
                    await sdps.start()
                    throttling = asyncio.create_task(sdps.run())
                # the destination's next word is READY; an ABORT (or a broken session) before
                # then ends pre-copy at once
                ready_task = asyncio.ensure_future(recv_message(session, 1e9))
                try:
                    async with asyncio.timeout(options.timeout_s):
                        paused = wait_migration(events, source, {"pre-switchover"}, 1e9)
                        if not await completed_or_message(paused, ready_task):
                            raise unexpected(ready_task.result(), "ready")
                except TimeoutError:
                    raise NotConverging(f"QEMU's pre-copy did not reach its downtime limit "
                                        f"within {options.timeout_s:g} s ("
                                        f"{await _precopy_figures(source, sdps)})") from None
                # QEMU stopped the vCPUs (pause-before-switchover): the blackout begins
                arm_blackout()
                result.paused_at = time.monotonic()
                governing.cancel()
                if throttling is not None:
                    throttling.cancel()

                async def release_throttle() -> None:
                    if sdps is not None:
                        result.sdps_max_throttle = sdps.max_throttle
                        sdps.release()  # at switchover, always

                await execute(machine.pause(), Effects(release_throttle=release_throttle,
                                                       pause_guest=nothing))
                emit("phase", note="source paused (pre-switchover)")
                if mirror is not None:
                    result.disk_seq = await mirror.finish(options.reply_timeout_s)
                    emit("blackout", step="disk mirror sealed", disk_seq=result.disk_seq)
                await session.send(Channel.CONTROL, control.Final(
                    migration, epoch, disk_seq=result.disk_seq, device_state_bytes=0).encode())
                await source.execute("migrate-continue", {"state": "pre-switchover"})
                machine.final_sent()
                emit("blackout", step="migrate-continue")
                # the vCPUs are stopped since pre-switchover: the source's RAM is final. Hashed
                # while the last pass crosses (not before migrate-continue: the hashing thread
                # would slow this loop's QMP); the digests go ahead of its last bytes
                hashing = asyncio.ensure_future(_send_ram_digests(session, source, emit))
                # READY (the destination loaded everything) and the source's completion (its
                # last bytes written into the tunnel) may come in either order: wait for both
                try:
                    completing = wait_migration(events, source, {"completed"},
                                                options.reply_timeout_s)
                    if not await completed_or_message(completing, ready_task):
                        reply = ready_task.result()
                        if not isinstance(reply, control.Ready):
                            raise unexpected(reply, "ready")
                        emit("blackout", step="ready received")
                        await wait_migration(events, source, {"completed"},
                                             options.reply_timeout_s)
                    result.completed_at = time.monotonic()
                    emit("blackout", step="source completed")
                    if not ready_task.done():
                        async with asyncio.timeout(options.reply_timeout_s):
                            await ready_task
                        emit("blackout", step="ready received")
                    reply = ready_task.result()
                finally:
                    ready_task.cancel()
            if not isinstance(reply, control.Ready):
                raise unexpected(reply, "ready")
            sent = tunnel.sent.bytes
            if reply.digests.get("stream_bytes") != str(sent):
                raise MigrationError(
                    f"the destination took {reply.digests.get('stream_bytes')} "
                    f"bytes of the stream, the source sent {sent}")
            assert hashing is not None
            stale = ramcheck.decode_chunks(reply.digests.get("ram_stale", ""),
                                           len(await hashing))
            result.ram_chunks_repaired = len(stale)
            fixups = await asyncio.to_thread(ramcheck.encode_fixups, source.mem_path, stale)
            # the destination writes these into its RAM before it runs (GO waits for them)
            for message in fixups:
                await session.send(Channel.DEVICE_STATE, message)
            emit("blackout", step="ram checked", repaired_chunks=len(stale))
            commit = machine.ready(reply.epoch)

        async def send_go() -> None:
            await session.send(Channel.CONTROL, control.Go(migration, epoch, token).encode())

        # GO journaled, then sent: the source QEMU never runs again, whatever happens next.
        # The repaired chunks are journaled with it: settling a destination left in doubt
        # sends them again (xmig.guest.qemu.settle)
        await execute(commit, Effects(journal=lambda kind: journal.append(
            kind, migration, epoch, ram_repair=[int(c) for c in stale]), send_go=send_go))
        result.committed_at = time.monotonic()
        emit("phase", note="GO sent")
    except (XmigError, OSError, asyncio.CancelledError) as err:
        if ready_task is not None:
            ready_task.cancel()
        if governing is not None:
            governing.cancel()
        if throttling is not None:
            throttling.cancel()
        if sdps is not None:
            result.sdps_max_throttle = sdps.max_throttle
            sdps.release()
        if hashing is not None:
            hashing.cancel()
        if mirror is not None:
            result.disk = mirror.progress()
        if not machine.may_resume_source:  # GO journaled: in doubt until settled
            if machine.phase is SourcePhase.COMMITTED:
                machine.cut_off()
            else:
                machine.fail(str(err) or type(err).__name__)
            result.status, result.error = "in-doubt", f"{type(err).__name__}: {err}"
            raise
        def aborted(error: str) -> None:
            result.status, result.error = "aborted", error
            emit("phase", note=f"aborted: {error}")

        await run_abort(_abort_source(machine, session, source, tunnel, mirror, journal,
                                      migration, epoch, token, err, migrating), err, aborted)
    finally:
        if governor is not None:
            result.bandwidth = list(governor.history)

    # -- after GO: the destination runs; the source QEMU stays paused (postmigrate) -------
    why = ""
    try:
        reply = await recv_message(session, options.reply_timeout_s)
        if isinstance(reply, control.Resumed):
            result.resumed_at, result.resumed_seen_at = reply.at, time.monotonic()
            machine.resumed()
        else:
            why = f"got {reply.type}"
    except (XmigError, TimeoutError) as err:
        why = f"{type(err).__name__}: {err}"
    with contextlib.suppress(XmigError):
        result.qemu_info = dict(await source.execute("query-migrate"))
    result.stream = tunnel.stats()
    await tunnel.close()
    if mirror is not None:
        result.disk = mirror.progress()
        await mirror.close()
    if why:  # GO journaled, unconfirmed: the caller settles it (xmig.qemusource)
        machine.cut_off()
        result.status, result.error = "in-doubt", f"no RESUMED after GO: {why}"
        emit("phase", note="in doubt: GO journaled, the destination has not confirmed")
        return result
    result.status = "done"
    emit("phase", note="destination running")
    return result


MiB = 1 << 20


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


#: how long QEMU has to fail its migration on its own once its stream is cut
SEVER_WAIT_S = 5.0


async def cancel_migration(source: QemuGuest,
                           sever: Callable[[], Awaitable[None]] | None = None,
                           timeout: float = 10.0) -> None:
    """End QEMU's outgoing migration if it is live, and wait until it ended (QEMU restarts
    the vCPUs it stopped once it ends).

    With ``sever`` (:meth:`SourceTunnel.sever`: our end of its stream shut down both ways
    but kept open), the stream is cut first: QEMU's writes, blocked in a stalled tunnel or
    not, fail with EPIPE and it fails the migration on its own network-failure path; the
    caller closes the socket only after this returned. ``migrate_cancel`` only when QEMU
    writes nothing that could fail (parked at ``pre-switchover``, its migration thread
    waits on a semaphore) or lingers past :data:`SEVER_WAIT_S`: never while a write of its
    stream is blocked.

    Why: QEMU 7.2 with the ``return-path`` capability reads the same socket in a second
    thread, and that thread, on the stream's end or reset, closes the socket itself
    (``source_return_path_thread`` -> ``migration_release_from_dst_file`` ->
    ``qemu_fclose(rp)`` -> ``qio_channel_close``) while the migration thread still writes
    to it, and nothing joins it on a pre-copy failure (only ``migration_completion`` calls
    ``await_return_path_close_on_source``). Seen here: ``sendmsg(-1)`` = EBADF in the
    migration thread after the return-path thread's ``close``, the descriptor reused by the
    main loop. Upstream moved that close into the main thread after a join only in
    8.1.2/8.2. So the source QEMU runs without a return path, and this order keeps QEMU's
    own teardown (``migrate_fd_cleanup``) from racing anything of ours. (The heap
    corruption seen in the same runs was the disk mirror's: :func:`_abort_source`.)"""
    with source.listener("MIGRATION") as events:
        status = (await source.execute("query-migrate")).get("status")
        if status not in LIVE_STATES:
            return
        if sever is not None:
            await sever()
            if status != "pre-switchover":
                with contextlib.suppress(QemuError):
                    status = await wait_migration(
                        events, source, {"cancelled", "failed", "pre-switchover"},
                        SEVER_WAIT_S)
            if status in FAILED_STATES:
                return
            if (await source.execute("query-migrate")).get("status") not in LIVE_STATES:
                return
        await source.execute("migrate_cancel")
        await wait_migration(events, source, {"cancelled", "failed"}, timeout)


async def _abort_source(machine: SourceMachine, session: TransportSession, source: QemuGuest,
                        tunnel: SourceTunnel | None, mirror: SourceDiskMirror | None,
                        journal: Journal, migration: str, epoch: int, token: str,
                        err: BaseException, migrating: bool) -> bool:
    """Before GO: end the disk mirror, then QEMU's migration, make sure the source runs,
    tell the destination. Whether the destination may hold a paused copy that has not
    heard ABORT (it may have voted READY: QEMU had paused the guest here).

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
    was_paused = machine.phase in (SourcePhase.BLACKOUT, SourcePhase.PREPARE)
    told = True

    async def stop_mirror() -> None:
        if mirror is not None:
            await mirror.close()

    async def stop_transfer() -> None:
        with contextlib.suppress(XmigError):
            if migrating:
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

    async def send_abort() -> None:
        nonlocal told
        told = await tell_abort(session, control.Abort(
            migration, epoch, control.error_text(err), token))

    # the throttle was released already, where the error was caught
    await execute(machine.abort(str(err)), Effects(
        journal=lambda kind: journal.append(kind, migration, epoch,
                                            reason=f"{type(err).__name__}: {err}"),
        release_throttle=nothing, stop_mirror=stop_mirror, stop_transfer=stop_transfer,
        resume_guest=resume_guest, send_abort=send_abort))
    return was_paused and not told
