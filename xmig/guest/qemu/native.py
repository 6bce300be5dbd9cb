"""QEMU's own migration, driven the way libvirt drives a non-shared-storage migration
(``VIR_MIGRATE_NON_SHARED_DISK`` + auto-converge): the baseline ``bench/vs_qemu.py`` measures
xmig against. No xmig session: QEMU's sockets cross the link themselves.

    destination QEMU (-incoming defer -S, fresh raw image): nbd-server-start ADDR:NBD_PORT,
    block-export-add (nbd, writable) of its disk node
    source QEMU: blockdev-add nbd -> ADDR:NBD_PORT, blockdev-mirror sync=full (background)
                 until BLOCK_JOB_READY
    source caps events, auto-converge, pause-before-switchover; downtime-limit, max-bandwidth;
    destination migrate-incoming tcp:ADDR:PORT; source migrate tcp:ADDR:PORT
    MIGRATION pre-switchover (source vCPUs stopped): block-job-cancel (in sync: completes
    without pivot, ~1 RTT to flush), migrate-continue; both sides completed;
    destination nbd-server-stop, cont

Times are ``time.monotonic()`` on this host (both QEMUs run here): ``paused_at`` when the
source's ``pre-switchover`` event arrived, ``resumed_at`` when the destination's ``cont``
returned, as :mod:`~xmig.guest.qemu.migrate` measures xmig's side. When pre-copy has not
reached ``pre-switchover`` within ``timeout_s`` (from the start, mirror included):
``migrate_cancel``, the mirror cancelled, the destination quit, ``converged`` False, the
source runs on. The caller owns the running destination guest in the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener

from xmig.errors import QemuError, XmigError
from xmig.guest.qemu.machine import PopenFn, QemuConfig, QemuGuest
from xmig.guest.qemu.mirror import disk_size
from xmig.guest.qemu.qmpmig import cancel_migration, wait_migration

JOB = "native-mirror"
NODE = "native-nbd"
EXPORT = "d0"
JOB_DONE = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")


@dataclass(frozen=True)
class NativeOptions:
    downtime_limit_ms: int = 300  #: as QemuMigrationOptions' default
    max_bandwidth_Bps: int | None = None  #: None leaves QEMU's default (libvirt: unlimited)
    auto_converge: bool = True
    copy_mode: str = "background"  #: libvirt's default; "write-blocking": its
    #: VIR_MIGRATE_NON_SHARED_SYNCHRONOUS_WRITES
    timeout_s: float = 300.0  #: from the start to pre-switchover (mirror + pre-copy)
    reply_timeout_s: float = 60.0  #: each step after the pause
    migrate_port: int = 49152
    nbd_port: int = 49153
    sample_s: float = 0.5  #: query-migrate sampling period (auto-converge's throttle)


@dataclass
class NativeResult:
    status: str = "running"  #: "completed", "not-converged" or "failed"
    converged: bool = False
    error: str | None = None
    started: float = 0.0
    mirror_ready_at: float = 0.0
    paused_at: float = 0.0  #: the source's pre-switchover event
    completed_at: float = 0.0  #: both sides reported completed
    resumed_at: float = 0.0  #: the destination's cont returned
    steps_ms: dict[str, float] = field(default_factory=dict)  #: from the pause
    qemu_info: dict[str, Any] = field(default_factory=dict)  #: source query-migrate, last
    max_throttle_pct: int = 0  #: auto-converge's highest cpu-throttle-percentage seen
    mirror_job: dict[str, Any] = field(default_factory=dict)  #: query-block-jobs at a failure
    destination: QemuGuest | None = None  #: runs after completion; the caller owns it
    image: Path | None = None  #: the destination's disk image


async def _caps(guest: QemuGuest, **caps: bool) -> None:
    await guest.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": name.replace("_", "-"), "state": state} for name, state in caps.items()]})


async def _node_name(guest: QemuGuest, device: str = "d0") -> str:
    for block in await guest.execute("query-block"):
        if block.get("device") == device and "inserted" in block:
            return str(block["inserted"]["node-name"])
    raise QemuError(f"{guest.config.name}: no block device {device}")


async def _wait_job(events: EventListener, wanted: tuple[str, ...], timeout: float
                    ) -> dict[str, Any]:
    try:
        async with asyncio.timeout(timeout):
            while True:
                event = await events.get()
                data: Any = event.get("data", {})
                if data.get("device") != JOB:
                    continue
                name = str(event["event"])
                if name in wanted:
                    if data.get("error"):
                        raise QemuError(f"native mirror: {name}: {data['error']}")
                    return dict(data)
                if name in ("BLOCK_JOB_ERROR", *JOB_DONE):
                    raise QemuError(f"native mirror ended: {name} {data}")
    except TimeoutError:
        raise QemuError(f"native mirror: no {list(wanted)} within {timeout:g} s") from None


async def _sample(source: QemuGuest, result: NativeResult, period: float) -> None:
    """auto-converge's throttle, sampled (query-migrate shows it only while active)."""
    while True:
        with contextlib.suppress(XmigError):
            info = await source.execute("query-migrate")
            result.max_throttle_pct = max(result.max_throttle_pct,
                                          int(info.get("cpu-throttle-percentage", 0)))
        await asyncio.sleep(period)


async def migrate_native(source: QemuGuest, template: QemuConfig, *, dst_addr: str,
                         workdir: Path, popen: PopenFn | None = None,
                         options: NativeOptions = NativeOptions()) -> NativeResult:
    """Migrate the running ``source`` with QEMU's own migration to a destination QEMU
    started from ``template`` with ``popen`` (e.g. in the link's destination namespace),
    listening on ``dst_addr``. Never raises for a migration that fails or does not
    converge: the result says so (``status``, ``error``), both QEMUs cleaned up but the
    source, which runs on."""
    result = NativeResult(started=time.monotonic())
    deadline = result.started + options.timeout_s
    size = disk_size(source)
    workdir.mkdir(parents=True, exist_ok=True)
    dest: QemuGuest | None = None
    job = migrating = False
    sampler: asyncio.Task[None] | None = None

    def step(name: str) -> None:
        result.steps_ms[name] = round((time.monotonic() - result.paused_at) * 1000, 1)

    try:
        with contextlib.ExitStack() as stack:
            extra = (*template.extra, "-incoming", "defer", "-S")
            config = replace(template, extra=extra)
            if size:
                result.image = workdir / f"{template.name}.raw"
                result.image.touch()
                os.truncate(result.image, size)  # sparse, fresh
                config = replace(config, disk=result.image)
            dest = await QemuGuest.launch(config, workdir, popen=popen)
            await _caps(dest, events=True, late_block_activate=True)
            jobs = stack.enter_context(source.listener("BLOCK_JOB_READY", "BLOCK_JOB_ERROR",
                                                       *JOB_DONE))
            if size:
                await dest.execute("nbd-server-start", {"addr": {"type": "inet", "data": {
                    "host": dst_addr, "port": str(options.nbd_port)}}})
                await dest.execute("block-export-add", {
                    "type": "nbd", "id": EXPORT, "node-name": await _node_name(dest),
                    "name": EXPORT, "writable": True})
                await source.execute("blockdev-add", {
                    "driver": "nbd", "node-name": NODE, "export": EXPORT,
                    "server": {"type": "inet", "host": dst_addr,
                               "port": str(options.nbd_port)}})
                await source.execute("blockdev-mirror", {
                    "job-id": JOB, "device": "d0", "target": NODE, "sync": "full",
                    "copy-mode": options.copy_mode})
                job = True
                await _wait_job(jobs, ("BLOCK_JOB_READY",), deadline - time.monotonic())
                result.mirror_ready_at = time.monotonic()
            await _caps(source, events=True, auto_converge=options.auto_converge,
                        pause_before_switchover=True)
            params: dict[str, object] = {"downtime-limit": options.downtime_limit_ms}
            if options.max_bandwidth_Bps is not None:
                params["max-bandwidth"] = int(options.max_bandwidth_Bps)
            await source.execute("migrate-set-parameters", params)
            uri = f"tcp:{dst_addr}:{options.migrate_port}"
            incoming = stack.enter_context(dest.listener("MIGRATION"))
            outgoing = stack.enter_context(source.listener("MIGRATION"))
            await dest.execute("migrate-incoming", {"uri": uri})
            await source.execute("migrate", {"uri": uri})
            migrating = True
            sampler = asyncio.create_task(_sample(source, result, options.sample_s))
            left = deadline - time.monotonic()
            await wait_migration(outgoing, source, {"pre-switchover"}, left)
            # the source's vCPUs are stopped: the blackout begins
            result.paused_at = time.monotonic()
            sampler.cancel()
            if job:
                await source.execute("block-job-cancel", {"device": JOB})
                await _wait_job(jobs, JOB_DONE, options.reply_timeout_s)
                job = False
                step("mirror cancelled")
            await source.execute("migrate-continue", {"state": "pre-switchover"})
            step("migrate-continue")
            await asyncio.gather(
                wait_migration(outgoing, source, {"completed"}, options.reply_timeout_s),
                wait_migration(incoming, dest, {"completed"}, options.reply_timeout_s))
            result.completed_at = time.monotonic()
            step("completed")
            if size:
                await dest.execute("nbd-server-stop")
                step("nbd-server-stop")
            await dest.cont()
            result.resumed_at = time.monotonic()
            step("destination running")
        result.status, result.converged = "completed", True
        with contextlib.suppress(XmigError):
            result.qemu_info = dict(await source.execute("query-migrate"))
        result.destination, dest = dest, None
        return result
    except asyncio.CancelledError:
        await _cancel(source, migrating=migrating, job=job)
        raise
    except (XmigError, OSError) as err:
        result.error = f"{type(err).__name__}: {err}"
        timed_out = not result.paused_at and time.monotonic() >= deadline - 0.5
        result.status = "not-converged" if timed_out else "failed"
        with contextlib.suppress(XmigError):
            result.qemu_info = dict(await source.execute("query-migrate"))
            jobs = await source.execute("query-block-jobs")
            result.mirror_job = dict(jobs[0]) if jobs else {}
        await _cancel(source, migrating=migrating, job=job)
        return result
    finally:
        if sampler is not None:
            sampler.cancel()
        if dest is not None:
            await dest.quit()


async def _cancel(source: QemuGuest, *, migrating: bool, job: bool) -> None:
    """Before completion: cancel QEMU's migration and the mirror; the source runs on."""
    if migrating:
        with contextlib.suppress(XmigError):
            await cancel_migration(source)
    if job:
        with contextlib.suppress(XmigError), source.listener(*JOB_DONE) as events:
            await source.execute("block-job-cancel", {"device": JOB, "force": True})
            await _wait_job(events, JOB_DONE, 10.0)
    with contextlib.suppress(XmigError):
        await source.execute("blockdev-del", {"node-name": NODE})
    with contextlib.suppress(XmigError):
        if await source.status() in ("paused", "finish-migrate"):
            await source.cont()

