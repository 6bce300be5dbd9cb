"""QEMU migrations that meet trouble (issue 4, section 4): a link cut while the disk is being
mirrored, the destination QEMU killed in pre-copy, a destination agent that never answers
READY after the source QEMU completed, a destination that
cannot start QEMU or has no room for the disk. After each: the migration completes, or it
aborts with a typed error and the source guest runs on with its disk intact."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from xmig.errors import (
    DeadlineExceeded,
    DiskFull,
    DiskTooSmall,
    MigrationAborted,
    QemuError,
    XmigError,
)
from xmig.events import Event, QemuProgress
from xmig.guest.qemu import QemuConfig, QemuGuest, check_records
from xmig.guest.qemu.image import GuestImage
from xmig.guest.qemu.migrate import QemuMigrationOptions
from xmig.guest.qemu.mirror import NODE, SourceDiskMirror
from xmig.netem import Wan
from xmig.orchestrator.run import migrate_qemu, receive_qemu
from xmig.protocol import control
from xmig.protocol.journal import Journal
from xmig.storage.engine import DiskReceiver
from xmig.storage.raw import RawFileBackend
from xmig.transport import Channel, TransportSession

from .helpers import loopback_sessions
from .test_migrate import (
    BOOT_S,
    DISK,
    RUN_S,
    drain_console,
    guest_config,
    migrate_over_wan,
    wan_sessions,
)

pytestmark = [pytest.mark.root, pytest.mark.qemu, pytest.mark.slow]


def source_disk(tmp: Path) -> Path:
    (tmp / "src").mkdir(parents=True, exist_ok=True)
    disk = tmp / "src" / "disk.raw"
    disk.touch()
    os.truncate(disk, DISK)
    return disk


async def assert_runs_on_with_its_records(source: QemuGuest, disk: Path) -> None:
    """The source guest runs (its counter moves), and its disk holds every record it wrote."""
    assert await source.status() == "running"
    now = await source.wait_for_progress(10)
    later = await source.wait_for_progress(10, min_counter=now.counter + 1)
    assert later.counter > now.counter
    assert await source.execute("query-block-jobs") == []
    await source.stop()
    last = await drain_console(source)
    check = check_records(disk, last.disk_seq, area=DISK)
    assert check.ok and check.checked > 0, check


async def test_a_link_cut_while_the_disk_is_mirrored_is_absorbed(
        guest_image: GuestImage, tmp_path: Path) -> None:
    """memdisk writing its disk through the mirror; the link is cut for 6 s (past the
    session's idle timeout) once the mirror runs and the stream is under way: the guest's
    writes queue in the mirror, the session resumes, the migration completes and the
    destination image holds every record the source wrote."""
    disk = source_disk(tmp_path)
    config = guest_config(guest_image, "memdisk", disk=disk, mem_mb=16, mem_rate=2,
                          disk_rate=1)
    template = guest_config(guest_image, "memdisk", name="dst")
    cut: dict[str, Any] = {}

    def cut_once(wan: Wan, event: dict[str, Any]) -> None:
        if event.get("note") == "disk mirror ready":
            cut["mirror_ready"] = True
        sent = event.get("stream", {}).get("sent", {}).get("bytes", 0)
        if event["event"] == "progress" and cut.get("mirror_ready") and sent > 4_000_000 \
                and "at_bytes" not in cut:
            cut["at_bytes"] = sent
            wan.cut()
            asyncio.get_running_loop().call_later(6.0, wan.restore)

    async with await QemuGuest.launch(config, tmp_path / "src") as source:
        await source.wait_for_progress(BOOT_S, min_counter=1)
        m = await migrate_over_wan(tmp_path, source, template,
                                   QemuMigrationOptions(reply_timeout_s=RUN_S),
                                   on_source_event=cut_once)
        try:
            assert "at_bytes" in cut, "the link was never cut"
            assert m.src.status == "done" and m.dst.status == "running"
            progress = [e for e in m.src.timeline if isinstance(e, QemuProgress)]
            assert progress[-1].session["connections_lost"] >= 1
            assert m.src.disk_seq > 0  # guest writes went through the mirror
            assert m.after.disk_seq >= m.before.disk_seq > 0
            assert m.dst.image is not None
            check = check_records(m.dst.image, m.before.disk_seq, area=DISK)
            assert check.ok and check.checked > 0, check
        finally:
            if m.dst.guest is not None:
                await m.dst.guest.quit()


async def test_the_destination_qemu_killed_in_pre_copy_aborts_and_the_source_runs_on(
        guest_image: GuestImage, tmp_path: Path) -> None:
    disk = source_disk(tmp_path)
    config = guest_config(guest_image, "memdisk", disk=disk, mem_mb=16, mem_rate=2,
                          disk_rate=0.5)
    template = guest_config(guest_image, "memdisk", name="dst")
    started: list[QemuGuest] = []
    killed = asyncio.Event()

    async def launch(cfg: QemuConfig) -> QemuGuest:
        guest = await QemuGuest.launch(cfg, tmp_path / "dst")
        started.append(guest)
        return guest

    def kill_in_pre_copy(event: Event) -> None:
        sent = (event.stream.get("sent", {}).get("bytes", 0)
                if isinstance(event, QemuProgress) else 0)
        if sent > 4_000_000 and not killed.is_set():
            started[0].kill()
            killed.set()

    async with await QemuGuest.launch(config, tmp_path / "src") as source:
        await source.wait_for_progress(BOOT_S, min_counter=1)
        async with wan_sessions(tmp_path) as s:
            dst_task = asyncio.create_task(receive_qemu(
                s.dst, template, workdir=tmp_path / "dst", launch=launch,
                journal=Journal(tmp_path / "dst" / "journal"), reply_timeout_s=RUN_S))
            src_task = asyncio.create_task(migrate_qemu(
                s.src, source, migration="q1", journal=Journal(tmp_path / "src" / "journal"),
                workdir=tmp_path / "src", on_progress=kill_in_pre_copy,
                options=QemuMigrationOptions(reply_timeout_s=RUN_S)))
            async with asyncio.timeout(60):  # told by the destination, not at a timeout
                src_res, dst_res = await asyncio.gather(src_task, dst_task,
                                                        return_exceptions=True)
        assert killed.is_set()
        assert isinstance(src_res, MigrationAborted), src_res
        # the destination's ABORT, or QEMU's own failure as its stream's far end goes
        assert isinstance(src_res.__cause__, XmigError), src_res.__cause__
        # its QEMU gone (QemuError), or the source's ABORT came first (MigrationError)
        assert isinstance(dst_res, XmigError), dst_res
        assert [r.kind for r in Journal(tmp_path / "src" / "journal").records()] == [
            "START", "ABORT"]
        assert [r.kind for r in Journal(tmp_path / "dst" / "journal").records()] == [
            "DISCARDED"]
        assert not (tmp_path / "dst" / "disk.raw").exists()
        await assert_runs_on_with_its_records(source, disk)


async def test_closing_a_running_disk_mirror_stops_the_vcpus_around_its_cancel(
        guest_image: GuestImage, tmp_path: Path) -> None:
    """An abort's SourceDiskMirror.close() with the job running and the guest writing: the
    vCPUs stop before the force-cancel (QEMU 7.2 frees the job's in-flight bitmap before it
    drains the guest's write-blocking writes, which then write into it) and run again once
    the job has ended and its NBD node is gone; the guest runs on with its records."""
    disk = source_disk(tmp_path)
    config = guest_config(guest_image, "memdisk", disk=disk, mem_mb=16, mem_rate=2,
                          disk_rate=0.5)
    async with await QemuGuest.launch(config, tmp_path / "src") as source:
        await source.wait_for_progress(BOOT_S, min_counter=1)
        async with loopback_sessions() as (src, dst):
            image = RawFileBackend.create(tmp_path / "dst.raw", DISK)
            receiver = DiskReceiver(dst, image, epoch=1, fresh=True)
            await receiver.start()
            mirror = SourceDiskMirror(src, source, workdir=tmp_path / "src", epoch=1)
            try:
                await mirror.start(RUN_S)
                await source.wait_for_progress(10)  # writing through the mirror
                with source.listener("STOP", "RESUME", "BLOCK_JOB_CANCELLED") as events:
                    await mirror.close()
                    seen = []
                    while not events.empty():
                        seen.append((await events.get())["event"])
            finally:
                await mirror.close()
                await receiver.stop()
                image.close()
        assert seen == ["STOP", "BLOCK_JOB_CANCELLED", "RESUME"], seen
        nodes = await source.execute("query-named-block-nodes")
        assert NODE not in [n.get("node-name") for n in nodes]
        assert not mirror.shadow_path.exists()
        await assert_runs_on_with_its_records(source, disk)


async def answer_prepared(session: TransportSession) -> control.Negotiate:
    """A destination agent's first steps, and no QEMU: NEGOTIATE read, PREPARED sent."""
    negotiate = control.decode(await session.recv(Channel.CONTROL))
    assert isinstance(negotiate, control.Negotiate)
    await session.send(Channel.CONTROL, control.Prepared(negotiate.migration).encode())
    return negotiate


async def until_abort(session: TransportSession) -> control.Abort:
    """Read the control channel up to the source's ABORT (it waits until it was read)."""
    while True:
        msg = control.decode(await session.recv(Channel.CONTROL))
        if isinstance(msg, control.Abort):
            return msg


async def test_no_ready_after_the_source_qemu_completed_aborts_and_it_runs_on(
        guest_image: GuestImage, tmp_path: Path) -> None:
    """The destination agent takes the whole stream but never answers READY: the source
    QEMU (no return path) completes once its last bytes are in the tunnel and waits,
    ``postmigrate``, disks handed over; at the blackout's deadline (3 s, well before the
    60 s reply timeout) xmig aborts and continues it (``cont`` takes its disk back): the
    guest runs on in the same process."""
    config = guest_config(guest_image, "mem", mem_mb=8, mem_rate=1)

    async def swallow(session: TransportSession, channel: Channel) -> None:
        while True:
            await session.recv(channel)

    async with await QemuGuest.launch(config, tmp_path / "src") as source:
        await source.wait_for_progress(BOOT_S, min_counter=1)
        async with loopback_sessions() as (src, dst):
            async def destination() -> control.Abort:
                await answer_prepared(dst)
                readers = [asyncio.create_task(swallow(dst, channel))
                           for channel in (Channel.MEMORY, Channel.DEVICE_STATE)]
                try:
                    return await until_abort(dst)  # FINAL is read and ignored
                finally:
                    for task in readers:
                        task.cancel()

            dst_task = asyncio.create_task(destination())
            src_task = asyncio.create_task(migrate_qemu(
                src, source, migration="q1", journal=Journal(tmp_path / "src" / "journal"),
                workdir=tmp_path / "src", options=QemuMigrationOptions(
                    reply_timeout_s=60, blackout_timeout_s=3)))
            async with asyncio.timeout(90):
                src_res, dst_res = await asyncio.gather(src_task, dst_task,
                                                        return_exceptions=True)
        assert isinstance(src_res, MigrationAborted), src_res
        assert isinstance(src_res.__cause__, DeadlineExceeded), repr(src_res.__cause__)
        assert "blackout passed its deadline of 3 s" in str(src_res.__cause__)
        assert isinstance(dst_res, control.Abort), dst_res
        assert (await source.execute("query-migrate"))["status"] == "completed"
        assert [r.kind for r in Journal(tmp_path / "src" / "journal").records()] == [
            "START", "ABORT"]
        assert await source.status() == "running"
        now = await source.wait_for_progress(10)
        later = await source.wait_for_progress(10, min_counter=now.counter + 1)
        assert later.counter > now.counter and source.alive


async def refused_by(tmp_path: Path, source: QemuGuest, template: QemuConfig,
                     dst_workdir: Path,
                     on_dest_event: Callable[[dict[str, Any]], None] = lambda e: None,
                     ) -> tuple[BaseException, BaseException]:
    """Migrate ``source``, expecting both sides to fail: their errors."""
    async with wan_sessions(tmp_path) as s:
        dst_task = asyncio.create_task(receive_qemu(
            s.dst, template, workdir=dst_workdir,
            on_event=lambda e: on_dest_event(e.to_json()),
            journal=Journal(tmp_path / "dst-journal"), reply_timeout_s=RUN_S))
        src_task = asyncio.create_task(migrate_qemu(
            s.src, source, migration="q1", journal=Journal(tmp_path / "src" / "journal"),
            workdir=tmp_path / "src", options=QemuMigrationOptions(reply_timeout_s=RUN_S)))
        async with asyncio.timeout(60):
            src_res, dst_res = await asyncio.gather(src_task, dst_task,
                                                    return_exceptions=True)
    assert isinstance(src_res, BaseException) and isinstance(dst_res, BaseException)
    return src_res, dst_res


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB filesystem (tmpfs) for the destination: the 16 MiB disk does not fit."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "xmig-test", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_a_destination_without_room_for_the_disk_refuses_typed(
        guest_image: GuestImage, tmp_path: Path, small_fs: Path) -> None:
    disk = source_disk(tmp_path)
    config = guest_config(guest_image, "memdisk", disk=disk, mem_mb=16, mem_rate=2,
                          disk_rate=0.5)
    async with await QemuGuest.launch(config, tmp_path / "src") as source:
        await source.wait_for_progress(BOOT_S, min_counter=1)
        src_res, dst_res = await refused_by(tmp_path, source,
                                            guest_config(guest_image, "memdisk", name="dst"),
                                            small_fs)
        assert isinstance(src_res, MigrationAborted), src_res
        assert isinstance(src_res.__cause__, DiskTooSmall), src_res.__cause__
        assert isinstance(dst_res, DiskTooSmall)
        assert list(small_fs.iterdir()) == []  # nothing was made there
        await assert_runs_on_with_its_records(source, disk)


async def test_a_destination_that_cannot_start_qemu_refuses_typed(
        guest_image: GuestImage, tmp_path: Path) -> None:
    disk = source_disk(tmp_path)
    config = guest_config(guest_image, "memdisk", disk=disk, mem_mb=16, mem_rate=2,
                          disk_rate=0.5)
    broken = replace(guest_config(guest_image, "memdisk", name="dst"),
                     qemu="/nonexistent/qemu-system-x86_64")
    async with await QemuGuest.launch(config, tmp_path / "src") as source:
        await source.wait_for_progress(BOOT_S, min_counter=1)
        src_res, dst_res = await refused_by(tmp_path, source, broken, tmp_path / "dst")
        assert isinstance(src_res, MigrationAborted), src_res
        assert isinstance(src_res.__cause__, QemuError), src_res.__cause__
        assert "qemu-system-x86_64 not found" in str(src_res.__cause__)
        assert isinstance(dst_res, XmigError)
        assert not (tmp_path / "dst" / "disk.raw").exists()
        await assert_runs_on_with_its_records(source, disk)


async def test_a_destination_disk_filling_up_mid_copy_aborts_typed(
        guest_image: GuestImage, tmp_path: Path, small_fs: Path) -> None:
    """The destination's filesystem has room for the disk at negotiate (4 MiB disk, 4 MiB
    tmpfs), then something else takes it: the mirror's writes meet ENOSPC, DiskFull travels
    back to the source, which aborts; its guest runs on with its records."""
    (tmp_path / "src").mkdir()
    disk = tmp_path / "src" / "disk.raw"
    disk.touch()
    os.truncate(disk, 4 << 20)
    config = guest_config(guest_image, "memdisk", disk=disk, mem_mb=16, mem_rate=2,
                          disk_rate=0.5)

    def fill(event: dict[str, Any]) -> None:
        if event.get("phase") == "receiving":  # PREPARED sent: the image exists, sparse
            with contextlib.suppress(OSError):
                (small_fs / "filler").write_bytes(b"\1" * (4 << 20))

    async with await QemuGuest.launch(config, tmp_path / "src") as source:
        await source.wait_for_progress(BOOT_S, min_counter=1)
        src_res, dst_res = await refused_by(
            tmp_path, source, guest_config(guest_image, "memdisk", name="dst"), small_fs,
            on_dest_event=fill)
        assert (small_fs / "filler").exists()
        assert isinstance(src_res, MigrationAborted), src_res
        assert "DiskFull" in str(src_res) or isinstance(src_res.__cause__, DiskFull), src_res
        assert isinstance(dst_res, XmigError), dst_res
        assert not (small_fs / "disk.raw").exists()
        assert await source.status() == "running"
        assert await source.execute("query-block-jobs") == []
        await source.stop()
        last = await drain_console(source)
        check = check_records(disk, last.disk_seq, area=4 << 20)
        assert check.ok and check.checked > 0, check
