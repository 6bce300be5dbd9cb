"""A whole migration on one machine: a guest, two agents, an emulated WAN between them. What
``xmig demo`` runs, and what the end-to-end tests and the benchmarks use. One harness for
every backend: :func:`run_local` takes a :class:`LocalRun` (the reference guest) or a
:class:`~xmig.harness.qemurun.QemuRun` (a QEMU guest, :mod:`~xmig.harness.qemurun`).

The source agent's sockets live in the emulator's source namespace and the destination
agent's in its destination namespace, so every migration byte crosses the emulated link.
The guests run as processes of this machine; their UDP service is reached through a small
relay standing for the network, which moves to the destination when it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from xmig.convergence import ControllerConfig
from xmig.convergence.forecast import Forecast, GuestRates, forecast
from xmig.errors import MigrationAborted
from xmig.guest.sim import (
    DowntimeProbe,
    SimClient,
    SimConfig,
    SimGuest,
    downtime_s,
    make_disk_image,
)
from xmig.guest.sim.dest import SimDestResult
from xmig.guest.sim.source import MigrationOptions, SimSourceResult
from xmig.harness.qemurun import QemuRun, run_qemu_local
from xmig.harness.wan import sessions_across
from xmig.netem import LinkSpec, Wan
from xmig.orchestrator.plan import sim_rates_of
from xmig.orchestrator.report import Report, aborted_report, ledger_check, source_report
from xmig.orchestrator.run import migrate, receive_migration
from xmig.protocol.journal import Journal
from xmig.storage.nbd import NbdServer
from xmig.storage.raw import RawFileBackend
from xmig.transport.certs import init_pki

MiB = 1 << 20


@dataclass(frozen=True)
class LocalRun:
    """One local migration: the guest, the link and the operator's options."""

    guest: SimConfig
    link: LinkSpec
    options: MigrationOptions = field(default_factory=MigrationOptions)
    disk_bytes: int = 64 * MiB
    warmup_s: float = 1.0  #: guest runs this long before the migration starts
    streams: int = 2


async def run_local(run: LocalRun | QemuRun, *, workdir: Path | None = None,
                    on_event: Callable[[dict[str, Any]], None] = lambda e: None,
                    ) -> Report:
    """Migrate a fresh guest (the reference guest, or QEMU's for a QemuRun) across an
    emulated link; return the report. ``on_event`` gets each event's JSON line."""
    if isinstance(run, QemuRun):
        return await run_qemu_local(run, workdir=workdir, on_event=on_event)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="xmig-")))
        src_dir, dst_dir = workdir / "src", workdir / "dst"
        src_dir.mkdir(parents=True, exist_ok=True)
        dst_dir.mkdir(parents=True, exist_ok=True)
        wan = stack.enter_context(Wan(run.link))
        pki = init_pki(workdir / "pki", server_names=(wan.dst_addr, "127.0.0.1"))
        disk_path = make_disk_image(src_dir / "disk.raw", run.disk_bytes)
        disk = stack.enter_context(RawFileBackend(disk_path))
        return await _migrate(run, wan, pki, disk, src_dir, dst_dir, on_event)
    raise AssertionError("unreachable")


async def _migrate(run: LocalRun, wan: Wan, pki: Any, disk: RawFileBackend, src_dir: Path,
                   dst_dir: Path, on_event: Callable[[dict[str, Any]], None]
                   ) -> Report:
    nbd = NbdServer(disk)
    sock = src_dir / "disk.nbd"
    await nbd.start_unix(sock)
    # the UDP service: the destination guest binds the source's port when it resumes (the
    # source's socket closes at pause), so one client address follows the guest across
    config = replace(run.guest, disk_url=f"nbd+unix:///?socket={sock}",
                     disk_bytes=run.disk_bytes, udp_addr=("127.0.0.1", 0))
    guest = await asyncio.to_thread(SimGuest.start, config, workdir=src_dir, name="src")
    dest: SimDestResult | None = None
    addr = guest.udp_address
    assert addr is not None
    # a client PUTting keys throughout, in a process of its own: this one is busy migrating
    probe = DowntimeProbe(addr, put_keys=True, own_process=True).start()
    try:
        before = await _rates_over(guest, disk, run.warmup_s)
        planned = _forecast(run, before)
        t0 = time.monotonic()
        async with sessions_across(wan, pki, streams=run.streams) as (session, dst_session):
            dst_task = asyncio.create_task(receive_migration(
                dst_session, workdir=dst_dir, journal=Journal(dst_dir / "journal")))
            src_progress_before = guest.progress()
            try:
                result = await migrate(session, guest, disk, nbd, migration="m1",
                                       journal=Journal(src_dir / "journal"),
                                       options=run.options,
                                       on_progress=lambda e: on_event(e.to_json()))
            except MigrationAborted as err:
                with contextlib.suppress(BaseException):
                    await dst_task
                seen = probe.stop()
                lost = await asyncio.to_thread(seen.missing, SimClient(addr))
                aborted = aborted_report(err, backend="sim", timeline=[],
                                         source_running=guest.running and not guest.paused,
                                         client_puts_acknowledged=len(seen.acknowledged),
                                         client_puts_lost=len(lost))
                aborted.forecast = planned
                return aborted
            dest = await dst_task
            total = time.monotonic() - t0
            src_prog = guest.progress()
            assert dest.guest is not None
            dst_prog = await _first_progress(dest.guest)
            wire = session.stats()
            seen = probe.stop()
            # every PUT the guest acknowledged, on either side, reads back from the
            # destination (its table migrated with the memory)
            lost_puts = await asyncio.to_thread(seen.missing, SimClient(addr))
            await asyncio.to_thread(guest.quit, keep_files=False)
            report = _report(run, result, dest, src_progress_before, src_prog, dst_prog,
                             before.progress_rate, total, wire, disk, guest.ledger_path)
            report.forecast = planned
            report.client_downtime_ms = round(seen.max_gap_s * 1000, 1)
            outside = seen.max_gap_outside(result.paused_at, dst_prog.resumed_at_mono)
            precopy_s = max(result.paused_at - t0, 1e-9)
            report.details.update(
                # the guest's own disk writes over the pre-copy (the convergence controller
                # slows them when they outrun the link)
                guest_disk_write_Bps=round((src_prog.disk_write_bytes
                                            - src_progress_before.disk_write_bytes) / precopy_s),
                # where the client's longest gap began, from the pause (negative: before it)
                client_gap_from_pause_ms=round((seen.gap_start_mono - result.paused_at) * 1000, 1),
                # the longest the migration kept the client waiting outside the blackout
                client_max_gap_outside_blackout_ms=round(outside * 1000, 1),
                client_puts_acknowledged=len(seen.acknowledged),
                client_puts_lost=len(lost_puts))
    finally:
        if not probe.report.duration_s:
            probe.stop()
        await asyncio.to_thread(guest.quit)
        await nbd.close()
        if dest is not None:
            if dest.guest is not None:
                await asyncio.to_thread(dest.guest.quit)
            if dest.nbd is not None:
                await dest.nbd.close()
            if dest.image is not None:
                dest.image.close()
    return report


@dataclass(frozen=True)
class _Before:
    """The guest over the warm-up, before the migration."""

    progress_rate: float  #: progress units per second
    rates: GuestRates


async def _rates_over(guest: SimGuest, disk: RawFileBackend, seconds: float) -> _Before:
    a, t0 = guest.progress(), time.monotonic()
    await asyncio.sleep(seconds)  # a measurement window
    b, dt = guest.progress(), max(time.monotonic() - t0, 1e-9)
    rates = await asyncio.to_thread(sim_rates_of, guest, disk, a, b, dt, seed=guest.config.seed)
    return _Before((b.counter - a.counter) / dt, rates)


def _forecast(run: LocalRun, before: _Before) -> Forecast | None:
    """What the convergence controller's model says of this run, from the warm-up's rates,
    a sample of the guest's memory and disk (what the first pass puts on the wire) and the
    emulated link's rate and RTT (None on an unshaped link: no rate to plan with)."""
    if run.link.rate_bps is None:
        return None
    config = ControllerConfig(budget_s=run.options.max_downtime_s,
                              timeout_s=run.options.timeout_s)
    return forecast(config, before.rates, rate_Bps=run.link.rate_bps / 8,
                    rtt_s=run.link.rtt_s)


async def _first_progress(guest: SimGuest, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        p = guest.progress()
        if p.first_progress_after_resume_mono > 0 or time.monotonic() > deadline:
            return p
        await asyncio.sleep(0.005)  # polling the guest's shared control block


def _report(run: LocalRun, src: SimSourceResult, dest: SimDestResult, before_prog: Any,
            src_prog: Any, dst_prog: Any, rate_before: float, total: float,
            wire: dict[str, Any], disk: RawFileBackend, ledger: Path) -> Report:
    # every write acknowledged to the source guest is on the source disk at pause, whose
    # digest equals the destination's at READY (verify): together, I2
    rate_during = (src_prog.counter - before_prog.counter) / max(src.paused_at - src.started,
                                                                  1e-9)
    report = source_report(
        src, total_s=total, downtime_s=downtime_s(src_prog, dst_prog), client_downtime_s=None,
        rate_before=rate_before, rate_during=rate_during, wire=wire,
        guest_bytes=run.guest.ram_bytes + run.disk_bytes, link_rate_bps=run.link.rate_bps,
        ledger=ledger_check(ledger, disk), verify=run.options.verify,
        options=dict(run.options.__dict__))
    report.details["link"] = run.link.to_dict()
    # the downtime's ends, from the pause the source agent asked for (ms; negative: before)
    report.details["downtime_parts_ms"] = {
        "last_progress": round((src_prog.last_progress_mono - src.paused_at) * 1000, 1),
        "guest_paused": round((src_prog.paused_at_mono - src.paused_at) * 1000, 1),
        "destination_resumed": round((dst_prog.resumed_at_mono - src.paused_at) * 1000, 1),
        "first_progress": round(
            (dst_prog.first_progress_after_resume_mono - src.paused_at) * 1000, 1),
    }
    return report
