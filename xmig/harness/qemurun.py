"""A whole QEMU migration on one machine: the test guest booted under TCG, two agents, the
emulated WAN between them. What ``xmig demo --guest qemu`` runs.

Two QEMU processes stand for the two hosts; the source agent's sockets live in the emulator's
source namespace and the destination agent's in its destination namespace, so the migration
stream, the mirrored disk writes and the commit messages all cross the emulated link. The
report has the reference guest's keys where they apply; ``verified`` means the guest's
serial counter continues on the destination from where the source's stopped and every disk
record the source guest reported written reads back intact from the destination image.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from xmig.convergence.forecast import Forecast, forecast
from xmig.errors import QemuError
from xmig.events import BlackoutStep, DestStep, Event, PhaseChanged
from xmig.guest.qemu import Progress, QemuConfig, QemuGuest, check_records
from xmig.guest.qemu.image import build_test_guest, guest_cmdline
from xmig.guest.qemu.migrate import QemuMigrationOptions, controller_config
from xmig.guest.qemu.plan import qemu_guest_rates
from xmig.harness.wan import sessions_across
from xmig.netem import LinkSpec, Wan
from xmig.orchestrator.report import Report, qemu_source_report
from xmig.orchestrator.run import migrate_qemu, receive_qemu
from xmig.protocol.journal import Journal
from xmig.transport.certs import init_pki

MiB = 1 << 20
BOOT_S = 90.0  #: boot to the workload's first line (TCG; two guests may share 2 cores)
REPORT_MS = 100  #: the workload's progress-line period


@dataclass(frozen=True)
class QemuRun:
    """One local QEMU migration: the guest, the link and the options."""

    link: LinkSpec
    build_dir: Path
    ram_mb: int = 128
    disk_bytes: int = 32 * MiB
    workload: str = "memdisk"
    params: dict[str, int | float | str] = field(
        default_factory=lambda: {"mem_mb": 32, "mem_rate": 8, "disk_rate": 1})
    options: QemuMigrationOptions = field(default_factory=QemuMigrationOptions)
    streams: int = 2
    #: the guest is measured this long before the migration for the report's forecast
    #: (:mod:`xmig.guest.qemu.plan`); 0: no forecast
    forecast_s: float = 1.0


async def run_qemu_local(run: QemuRun, *, workdir: Path | None = None,
                         on_event: Callable[[dict[str, Any]], None] = lambda e: None
                         ) -> Report:
    """Boot the test guest, migrate it across an emulated link; return the report."""
    image = await asyncio.to_thread(build_test_guest, run.build_dir)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="xmig-q-")))
        src_dir, dst_dir = workdir / "src", workdir / "dst"
        src_dir.mkdir(parents=True, exist_ok=True)
        dst_dir.mkdir(parents=True, exist_ok=True)
        disk = src_dir / "disk.raw"
        disk.touch()
        os.truncate(disk, run.disk_bytes)
        append = guest_cmdline(run.workload, report_ms=REPORT_MS, **run.params)
        config = QemuConfig(kernel=image.kernel, initrd=image.initrd, disk=disk,
                            ram_mb=run.ram_mb, name="src", append=append)
        wan = stack.enter_context(Wan(run.link))
        pki = init_pki(workdir / "pki", server_names=(wan.dst_addr, "127.0.0.1"))
        async with await QemuGuest.launch(config, src_dir) as source:
            first = await source.wait_for_progress(BOOT_S, min_counter=1)
            on_event({"event": "booted", "counter": first.counter, "up_ms": first.up_ms,
                      "disk_seq": first.disk_seq})
            return await _migrate(run, wan, pki, source, replace(config, name="dst", disk=None),
                                  src_dir, dst_dir, on_event)
    raise AssertionError("unreachable")


async def _migrate(run: QemuRun, wan: Wan, pki: Any, source: QemuGuest, template: QemuConfig,
                   src_dir: Path, dst_dir: Path, on_event: Callable[[dict[str, Any]], None]
                   ) -> Report:
    planned = await _forecast(run, source)
    link_before = link_bytes(wan)
    started = time.monotonic()
    async with sessions_across(wan, pki, streams=run.streams) as (session, dst_session):
        dst_steps: list[Event] = []
        receiving = asyncio.create_task(receive_qemu(
            dst_session, template, workdir=dst_dir, journal=Journal(dst_dir / "journal"),
            reply_timeout_s=run.options.reply_timeout_s, on_event=dst_steps.append))
        try:
            src = await migrate_qemu(session, source, migration="q1",
                                     journal=Journal(src_dir / "journal"), workdir=src_dir,
                                     options=run.options,
                                     on_progress=lambda e: on_event(e.to_json()))
        except BaseException:
            receiving.cancel()
            results = await asyncio.gather(receiving, return_exceptions=True)
            held = getattr(results[0], "guest", None)
            if isinstance(held, QemuGuest):
                await held.quit()
            raise
        dst = await receiving
        wire = session.stats()
    total = time.monotonic() - started
    on_link = link_bytes(wan) - link_before
    assert dst.guest is not None
    try:
        before = await _last_progress(source)
        after = await dst.guest.wait_for_progress(30)
        image = dst.image
        area = int(run.params["disk_mb"]) * MiB if "disk_mb" in run.params else None
        records = (await asyncio.to_thread(check_records, image, before.disk_seq, area=area)
                   if image is not None and run.workload in ("disk", "memdisk") else None)
    finally:
        await dst.guest.quit()
    continues = after.counter >= before.counter
    report = qemu_source_report(src, total_s=total, wire=wire,
                                guest_bytes=run.ram_mb * MiB + run.disk_bytes)
    report.verified = continues and (records is None or (records.ok and records.checked > 0))
    report.forecast = planned
    report.details.update({
        "guest_gap_ms": after.up_ms - before.up_ms,
        "link_bytes": on_link,
        "counter": {"source_last": before.counter, "destination_first": after.counter},
        "source_last": {"counter": before.counter, "up_ms": before.up_ms,
                        "disk_seq": before.disk_seq},
        "disk_records_checked": records.checked if records is not None else None,
        "link": run.link.to_dict(),
        "qemu_ram": src.qemu_info.get("ram", {}),
        "disk": src.disk,
        "stream_bytes": src.stream.get("sent", {}).get("bytes") if src.stream else None,
        # the destination's switchover steps, ms from the source's pause (one host clock)
        "source_steps_ms": _steps_after_pause(src.timeline),
        "destination_steps_ms": {e.step: round((e.at - src.paused_at) * 1000, 1)
                                 for e in dst_steps if isinstance(e, DestStep)},
    })
    return report


async def _forecast(run: QemuRun, source: QemuGuest) -> Forecast | None:
    """The convergence model's forecast from the guest measured for ``run.forecast_s`` and
    the emulated link's rate and RTT (None: no forecast asked, or an unshaped link)."""
    if run.forecast_s <= 0 or run.link.rate_bps is None:
        return None
    rates = await qemu_guest_rates(source, seconds=run.forecast_s)
    return forecast(controller_config(run.options), rates, rate_Bps=run.link.rate_bps / 8,
                    rtt_s=run.link.rtt_s)


def _steps_after_pause(timeline: list[Event]) -> dict[str, float]:
    """The source's switchover steps (blackout steps and phase notes), ms from its pause
    (QEMU's pre-switchover)."""
    out: dict[str, float] = {}
    paused: float | None = None
    for e in timeline:
        name = (e.step if isinstance(e, BlackoutStep) else
                e.note if isinstance(e, PhaseChanged) else None)
        if name == "guest paused":
            paused = e.t
        if paused is not None and name and e.t is not None:
            out[name] = round((e.t - paused) * 1000, 1)
    return out


async def _last_progress(guest: QemuGuest) -> Progress:
    """The newest progress line a stopped guest printed."""
    with contextlib.suppress(QemuError):
        await guest.wait_for_progress(0.3)
    if not guest.history:
        raise QemuError(f"guest {guest.config.name} printed no progress line")
    return guest.history[-1]


def link_bytes(wan: Wan) -> int:
    """Bytes the emulated link has forwarded so far, both directions (IP bytes in TUN mode:
    headers, TLS and retransmissions included)."""
    stats = wan.stats()
    return int(stats["fwd"]["forwarded_bytes"]) + int(stats["rev"]["forwarded_bytes"])


def default_build_dir() -> Path:
    """``$XMIG_GUEST_BUILD``, or ``build/guest`` (what ``make guest-image`` builds)."""
    return Path(os.environ.get("XMIG_GUEST_BUILD", "build/guest"))
