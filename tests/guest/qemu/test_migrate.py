"""A real QEMU guest migrates over the emulated WAN with xmig's transport (issue 4, section 2).

Two QEMU processes on this host stand for the two hosts; their agents (this test's two
sides) talk over a TLS session through the TUN link emulator. The source QEMU migrates into
the source agent's socket, the stream crosses the link on the memory channel, the
destination agent feeds it to a QEMU started ``-incoming defer -S``; the destination runs
only on GO. The guest's serial counter must continue on the destination from where it
stopped on the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from xmig.errors import MigrationAborted, NotConverging, QemuError, XmigError
from xmig.events import DowntimeBudget, QemuProgress
from xmig.guest.qemu import Progress, QemuConfig, QemuGuest, check_records
from xmig.guest.qemu.image import GuestImage, guest_cmdline
from xmig.guest.qemu.migrate import QemuMigrationOptions, QemuSourceResult
from xmig.guest.qemu.receive import QemuDestResult
from xmig.netem import LinkSpec, Wan
from xmig.netem.sessions import connect_across, listen_across
from xmig.orchestrator.run import migrate_qemu, receive_qemu
from xmig.protocol.journal import Journal
from xmig.transport import TransportSession
from xmig.transport.certs import init_pki
from xmig.transport.tls import client_context, server_context

pytestmark = [pytest.mark.root, pytest.mark.qemu, pytest.mark.slow]

LINK = LinkSpec.symmetric(rate_bps=100_000_000, rtt_s=0.05)
BOOT_S = 60.0
RUN_S = 90.0
REPORT_MS = 100


@dataclass
class Sessions:
    wan: Wan
    src: TransportSession
    dst: TransportSession


@contextlib.asynccontextmanager
async def wan_sessions(tmp: Path, link: LinkSpec = LINK) -> AsyncIterator[Sessions]:
    """A TLS session between a source and a destination agent across the emulated link."""
    with Wan(link) as wan:
        pki = init_pki(tmp / "pki", server_names=(wan.dst_addr, "127.0.0.1"))
        async with (listen_across(wan, tls=server_context(pki)) as lst,
                    connect_across(wan, lst.port, tls=client_context(pki), streams=2) as src):
            dst = await lst.accept()
            yield Sessions(wan, src, dst)


def guest_config(image: GuestImage, workload: str, *, disk: Path | None = None,
                 name: str = "src", **params: int | float | str) -> QemuConfig:
    return QemuConfig(kernel=image.kernel, initrd=image.initrd, disk=disk, ram_mb=128,
                      name=name,
                      append=guest_cmdline(workload, report_ms=REPORT_MS, **params))


async def drain_console(guest: QemuGuest) -> Progress:
    """Read every progress line a stopped guest printed; the newest."""
    with contextlib.suppress(QemuError):
        await guest.wait_for_progress(0.3)
    assert guest.history
    return guest.history[-1]


@dataclass
class Migrated:
    src: QemuSourceResult
    dst: QemuDestResult
    before: Progress  #: the source's last line
    after: Progress  #: the destination's first line
    total_s: float


async def migrate_over_wan(tmp: Path, source: QemuGuest, template: QemuConfig,
                           options: QemuMigrationOptions,
                           on_dest_event: Callable[[dict[str, Any]], None] = lambda e: None,
                           on_source_event: Callable[[Wan, dict[str, Any]], None] = (
                               lambda wan, e: None),
                           link: LinkSpec = LINK) -> Migrated:
    async with wan_sessions(tmp, link) as s:
        started = time.monotonic()
        dst_task = asyncio.create_task(receive_qemu(
            s.dst, template, workdir=tmp / "dst", journal=Journal(tmp / "dst" / "journal"),
            reply_timeout_s=RUN_S, on_event=lambda e: on_dest_event(e.to_json())))
        src_task = asyncio.create_task(migrate_qemu(
            s.src, source, migration="q1", journal=Journal(tmp / "src" / "journal"),
            workdir=tmp / "src", options=options,
            on_progress=lambda e: on_source_event(s.wan, e.to_json())))
        try:
            async with asyncio.timeout(RUN_S):
                src_res, dst_res = await asyncio.gather(src_task, dst_task)
        except BaseException:
            for task in (src_task, dst_task):
                task.cancel()
            results = await asyncio.gather(src_task, dst_task, return_exceptions=True)
            for r in results:
                if isinstance(r, QemuDestResult) and r.guest is not None:
                    await r.guest.quit()
            raise
        total = time.monotonic() - started
    assert dst_res.guest is not None
    before = await drain_console(source)
    after = await dst_res.guest.wait_for_progress(30)
    return Migrated(src_res, dst_res, before, after, total)


async def test_memory_migrates_and_the_counter_continues(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    config = guest_config(guest_image, "mem", mem_mb=32, mem_rate=4)
    template = guest_config(guest_image, "mem", name="dst")
    async with await QemuGuest.launch(config, tmp_path / "src") as source:
        first = await source.wait_for_progress(BOOT_S, min_counter=1)
        m = await migrate_over_wan(tmp_path, source, template,
                                   QemuMigrationOptions(reply_timeout_s=RUN_S))
        try:
            assert m.src.status == "done" and m.dst.status == "running"
            # the source ends paused for good (postmigrate), the destination runs
            assert await source.status() == "postmigrate"
            assert m.src.qemu_info.get("status") == "completed"
            dest = m.dst.guest
            assert dest is not None and await dest.status() == "running"
            # the counter continues: the destination's first line follows the source's last
            # (the guest's clock does not run while it is paused)
            assert m.before.counter > first.counter
            assert m.after.counter >= m.before.counter
            assert 0 <= m.after.up_ms - m.before.up_ms <= 3 * REPORT_MS + 500
            later = await dest.wait_for_progress(10, min_counter=m.after.counter + 1)
            assert later.counter > m.after.counter
            src_journal = [r.kind for r in Journal(tmp_path / "src" / "journal").records()]
            dst_journal = [r.kind for r in Journal(tmp_path / "dst" / "journal").records()]
            assert src_journal == ["START", "GO"] and dst_journal == ["READY", "RUNNING"]
            sent = m.src.stream["sent"]
            assert isinstance(sent, dict) and sent["bytes"] > 8 << 20
            # the 300 ms budget is the whole pause: QEMU's last pass gets what the commit's
            # round trips (1.5 x 50 ms here) and checks leave of it
            [split] = [e for e in m.src.timeline if isinstance(e, DowntimeBudget)]
            assert split.budget_ms == 300 and split.fits, split
            assert split.reserve_ms >= 75, split
            assert split.qemu_limit_ms == 300 - split.reserve_ms, split
            downtime_ms = (m.dst.resumed_at - m.src.paused_at) * 1000
            print(f"\ntotal {m.total_s:.2f} s, paused->resumed {downtime_ms:.0f} ms, "
                  f"repaired {m.src.ram_chunks_repaired} chunks, "
                  f"QEMU downtime {m.src.qemu_info.get('downtime')} ms, "
                  f"stream {sent['bytes']} B, return path {m.src.stream['received']}, "
                  f"bandwidth caps {len(m.src.bandwidth)} (last "
                  f"{m.src.bandwidth[-1][1] if m.src.bandwidth else None} B/s), "
                  f"counter {m.before.counter}->{m.after.counter}, "
                  f"up_ms {m.before.up_ms}->{m.after.up_ms}")
        finally:
            if m.dst.guest is not None:
                await m.dst.guest.quit()


DISK = 16 << 20


async def test_memory_and_disk_migrate_and_the_records_check_out(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    """memdisk: the disk mirrored through xmig's NBD server; the destination image at
    READY (its QEMU still paused) equals the source image at pause, and its records
    check out up to the last record the source guest reported."""
    (tmp_path / "src").mkdir()
    disk = tmp_path / "src" / "disk.raw"
    disk.touch()
    os.truncate(disk, DISK)
    params: dict[str, int | float | str] = {"mem_mb": 16, "mem_rate": 2, "disk_rate": 0.5}
    config = guest_config(guest_image, "memdisk", disk=disk, **params)
    template = guest_config(guest_image, "memdisk", name="dst")
    snapshot = tmp_path / "dst-at-ready.raw"

    steps: list[tuple[str, float]] = []

    def at_ready(event: dict[str, Any]) -> None:
        if "at" in event:
            steps.append((event["step"], event["at"]))
        if event.get("phase") == "ready":  # paused, applied and fsynced: copy it now
            shutil.copyfile(tmp_path / "dst" / "disk.raw", snapshot)

    async with await QemuGuest.launch(config, tmp_path / "src") as source:
        first = await source.wait_for_progress(BOOT_S, min_counter=1)
        m = await migrate_over_wan(tmp_path, source, template,
                                   QemuMigrationOptions(reply_timeout_s=RUN_S), at_ready)
        try:
            assert m.src.status == "done" and m.dst.status == "running"
            assert await source.status() == "postmigrate"
            dest = m.dst.guest
            assert dest is not None and await dest.status() == "running"
            assert m.before.disk_seq > first.disk_seq
            assert m.after.disk_seq >= m.before.disk_seq
            assert 0 <= m.after.up_ms - m.before.up_ms <= 3 * REPORT_MS + 500
            # the source image is as it was at pause (the source never ran again)
            assert snapshot.read_bytes() == disk.read_bytes()
            check = check_records(snapshot, m.before.disk_seq, area=DISK)
            assert check.ok and check.checked > 0, check
            later = await dest.wait_for_progress(10, min_counter=m.after.counter + 1)
            assert later.disk_seq > m.after.disk_seq
            downtime_ms = (m.dst.resumed_at - m.src.paused_at) * 1000
            print(f"\ntotal {m.total_s:.2f} s, mirror ready after "
                  f"{m.src.mirror_ready_at - m.src.started:.2f} s, "
                  f"paused->resumed {downtime_ms:.0f} ms, "
                  f"repaired {m.src.ram_chunks_repaired} chunks, disk {m.src.disk}, "
                  f"disk_seq {m.src.disk_seq}, stream {m.src.stream['sent']}, "
                  f"records {m.before.disk_seq}->{m.after.disk_seq}, "
                  f"up_ms {m.before.up_ms}->{m.after.up_ms}, timeline "
                  f"{[(e.t, e.to_json()) for e in m.src.timeline]}, "
                  f"dest {[(n, round(t - m.src.started, 3)) for n, t in steps]}")
        finally:
            if m.dst.guest is not None:
                await m.dst.guest.quit()


async def test_a_guest_outrunning_the_link_aborts_and_the_source_runs_on(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    """memdisk dirtying memory flat out (TCG: faster than 100 Mbit/s): QEMU's pre-copy never
    reaches its downtime limit; at the timeout the migration aborts before GO
    (NotConverging): QEMU's stream cut (QEMU fails the migration itself, on its network-failure
    path), the mirror job cancelled, the destination QEMU quit and its image deleted; the
    source guest runs on and its disk holds its records."""
    (tmp_path / "src").mkdir()
    disk = tmp_path / "src" / "disk.raw"
    disk.touch()
    os.truncate(disk, DISK)
    config = guest_config(guest_image, "memdisk", disk=disk, mem_mb=48, disk_rate=0.5)
    template = guest_config(guest_image, "memdisk", name="dst")
    async with await QemuGuest.launch(config, tmp_path / "src") as source:
        await source.wait_for_progress(BOOT_S, min_counter=1)
        async with wan_sessions(tmp_path) as s:
            dst_task = asyncio.create_task(receive_qemu(
                s.dst, template, workdir=tmp_path / "dst",
                journal=Journal(tmp_path / "dst" / "journal"), reply_timeout_s=RUN_S))
            src_task = asyncio.create_task(migrate_qemu(
                s.src, source, migration="q1", journal=Journal(tmp_path / "src" / "journal"),
                workdir=tmp_path / "src",
                options=QemuMigrationOptions(timeout_s=6.0, reply_timeout_s=RUN_S)))
            async with asyncio.timeout(RUN_S):
                src_res, dst_res = await asyncio.gather(src_task, dst_task,
                                                        return_exceptions=True)
        assert isinstance(src_res, MigrationAborted), src_res
        assert isinstance(src_res.__cause__, NotConverging)
        assert isinstance(dst_res, XmigError), dst_res
        assert await source.status() == "running"
        info = await source.execute("query-migrate")
        assert info.get("status") == "failed"  # ended by the cut stream, not migrate_cancel
        jobs = await source.execute("query-block-jobs")
        assert jobs == []
        now = await source.wait_for_progress(10)
        later = await source.wait_for_progress(10, min_counter=now.counter + 1)
        assert later.counter > now.counter
        assert [r.kind for r in Journal(tmp_path / "src" / "journal").records()] == [
            "START", "ABORT"]
        assert [r.kind for r in Journal(tmp_path / "dst" / "journal").records()] == [
            "DISCARDED"]
        assert not (tmp_path / "dst" / "disk.raw").exists()
        assert not (tmp_path / "src" / "src.mirror.raw").exists()
        await source.stop()
        last = await drain_console(source)
        check = check_records(disk, last.disk_seq, area=DISK)
        assert check.ok and check.checked > 0, check


async def test_a_link_cut_in_the_memory_stream_is_absorbed(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    """The link is cut for 6 s once 20 MB of QEMU's stream crossed it (longer than the
    session's 5 s idle timeout, so its connections die): the session resumes
    on new connections, QEMU on either side never notices, the migration completes."""
    config = guest_config(guest_image, "mem", mem_mb=32, mem_rate=4)
    template = guest_config(guest_image, "mem", name="dst")
    cut: dict[str, Any] = {}

    def cut_once(wan: Wan, event: dict[str, Any]) -> None:
        sent = event.get("stream", {}).get("sent", {}).get("bytes", 0)
        if event["event"] == "progress" and sent > 20_000_000 and not cut:
            cut["at_bytes"] = sent
            wan.cut()
            asyncio.get_running_loop().call_later(6.0, wan.restore)  # > the 5 s idle timeout

    async with await QemuGuest.launch(config, tmp_path / "src") as source:
        await source.wait_for_progress(BOOT_S, min_counter=1)
        m = await migrate_over_wan(tmp_path, source, template,
                                   QemuMigrationOptions(reply_timeout_s=RUN_S),
                                   on_source_event=cut_once)
        try:
            assert cut, "the stream never reached 20 MB"
            assert m.src.status == "done" and m.dst.status == "running"
            assert m.after.counter >= m.before.counter
            assert 0 <= m.after.up_ms - m.before.up_ms <= 3 * REPORT_MS + 500
            progress = [e for e in m.src.timeline if isinstance(e, QemuProgress)]
            assert progress[-1].session["connections_lost"] >= 1
            print(f"\ncut at {cut['at_bytes']} B: total {m.total_s:.2f} s, "
                  f"paused->resumed {(m.dst.resumed_at - m.src.paused_at) * 1000:.0f} ms, "
                  f"session {progress[-1].session}")
        finally:
            if m.dst.guest is not None:
                await m.dst.guest.quit()
