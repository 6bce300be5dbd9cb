"""The test guest boots under TCG and runs each workload; QMP stop/cont freeze and resume it;
the disk writer's records are on the raw image once the guest is stopped.

The four guests (mem, disk, cpu, memdisk) boot once for the module, together (a boot is
~8–16 s of one core under TCG). No skip: without QEMU these tests fail (CI installs it).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import pytest_asyncio

from xmig.errors import GuestNotFound, GuestStateError, QemuError
from xmig.guest.qemu import Progress, QemuConfig, QemuGuest, check_records
from xmig.guest.qemu.image import GuestImage, guest_cmdline

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

BOOT_S = 90.0  # four guests booting on two cores, with margin
DISK_BYTES = 32 << 20
WORKLOADS = ("mem", "disk", "cpu", "memdisk")


@dataclass
class Booted:
    guest: QemuGuest
    disk: Path
    first: Progress


def _config(image: GuestImage, workload: str, disk: Path) -> QemuConfig:
    params: dict[str, int | float | str] = {"report_ms": 100}
    if workload in ("mem", "memdisk"):
        params["mem_mb"] = 32
    if workload == "memdisk":
        params.update(mem_rate=64, disk_rate=2)
    return QemuConfig(
        kernel=image.kernel,
        initrd=image.initrd,
        disk=disk,
        append=guest_cmdline(workload, **params),
        ram_mb=192,
        name=f"t-{workload}",
    )


def _blank_disk(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def booted(
    guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, Booted]]:
    workdir = tmp_path_factory.mktemp("qemu")
    guests: list[QemuGuest] = []

    async def boot(workload: str) -> Booted:
        disk = _blank_disk(workdir / f"{workload}.raw", DISK_BYTES)
        guest = await QemuGuest.launch(_config(guest_image, workload, disk), workdir)
        guests.append(guest)
        first = await guest.wait_for_progress(BOOT_S, min_counter=1)
        return Booted(guest, disk, first)

    try:
        done = await asyncio.gather(*(boot(w) for w in WORKLOADS))
        yield dict(zip(WORKLOADS, done, strict=True))
    finally:
        await asyncio.gather(*(g.quit() for g in guests))


async def _frozen(guest: QemuGuest) -> Progress | None:
    """Stop the guest; the last progress line it printed (None if none since the last read),
    after checking that no new line comes for a second."""
    await guest.stop()
    assert await guest.status() == "paused"
    last: Progress | None = None
    # lines printed before the stop may still be in the log: take them
    while True:
        try:
            last = await guest.wait_for_progress(0.3)
        except QemuError:
            break
    with pytest.raises(QemuError, match="no progress within"):
        await guest.wait_for_progress(1.0)
    return last


@pytest.mark.parametrize("workload", WORKLOADS)
async def test_workload_makes_progress(booted: dict[str, Booted], workload: str) -> None:
    b = booted[workload]
    assert await b.guest.status() == "running"
    later = await b.guest.wait_for_progress(10, min_counter=b.first.counter + 1)
    assert later.counter > b.first.counter and later.up_ms > b.first.up_ms
    grew = {
        "mem_pages": later.mem_pages > b.first.mem_pages,
        "disk_seq": later.disk_seq > b.first.disk_seq,
        "cpu": later.cpu > b.first.cpu,
    }
    expected = {
        "mem": {"mem_pages"},
        "disk": {"disk_seq"},
        "cpu": {"cpu"},
        "memdisk": {"mem_pages", "disk_seq"},
    }[workload]
    assert {k for k, v in grew.items() if v} == expected


async def test_memdisk_runs_at_its_set_rates(booted: dict[str, Booted]) -> None:
    b = booted["memdisk"]
    start = await b.guest.wait_for_progress(10)
    end = await b.guest.wait_for_progress(10, min_counter=start.counter + 1)
    while end.up_ms - start.up_ms < 1500:
        end = await b.guest.wait_for_progress(10)
    rates = end.rates(start)
    # never over the set rates (the limiter); under them only as far as four TCG guests on
    # two cores allow (seen: 260 records/s of the 512 set, in CI): it is not a speed test
    assert 16 < rates["mem_MiB_s"] < 80  # 64 MiB/s set
    assert 128 < rates["disk_records_s"] < 640  # 2 MiB/s of 4 KiB records set


async def test_stop_freezes_the_counter_and_cont_resumes_it(booted: dict[str, Booted]) -> None:
    guest = booted["cpu"].guest
    frozen = await _frozen(guest)
    frozen = frozen or guest.last_progress
    assert frozen is not None
    await guest.cont()
    assert await guest.status() == "running"
    resumed = await guest.wait_for_progress(10, min_counter=frozen.counter + 1)
    assert resumed.counter > frozen.counter


@pytest.mark.parametrize("workload", ["disk", "memdisk"])
async def test_disk_records_are_on_the_image_after_stop(
    booted: dict[str, Booted], workload: str
) -> None:
    b = booted[workload]
    await b.guest.wait_for_progress(10, min_counter=b.first.counter + 1)
    last = await _frozen(b.guest) or b.guest.last_progress
    assert last is not None and last.disk_seq > 0
    check = check_records(b.disk, last.disk_seq)
    assert check.ok, check
    assert check.checked == min(last.disk_seq, DISK_BYTES // 4096)
    assert check.newest >= last.disk_seq - 1
    await b.guest.cont()


async def test_guest_ram_is_a_shared_file(booted: dict[str, Booted]) -> None:
    guest = booted["mem"].guest
    assert guest.mem_path.stat().st_size == 192 << 20
    threads = await guest.vcpu_threads()
    assert len(threads) == 1 and threads[0] > 0


async def test_qemu_killed_is_a_typed_error(booted: dict[str, Booted]) -> None:
    guest = booted["disk"].guest
    assert guest.pid is not None
    os.kill(guest.pid, signal.SIGKILL)
    with pytest.raises(QemuError, match="exited"):
        await guest.wait_for_progress(10, min_counter=1 << 62)
    with pytest.raises(QemuError):
        await guest.status()


async def test_quit_ends_qemu_and_removes_its_files(booted: dict[str, Booted]) -> None:
    guest = booted["cpu"].guest
    await guest.quit()
    assert guest.returncode == 0
    assert not guest.mem_path.exists() and not guest.qmp_socket.exists()
    with pytest.raises(GuestStateError):
        await guest.status()
    await guest.quit()  # idempotent


async def test_missing_kernel_initrd_or_disk_is_guest_not_found(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    config = _config(guest_image, "cpu", tmp_path / "disk.raw")  # disk missing
    for broken in (
        replace(config, kernel=tmp_path / "no-vmlinuz"),
        replace(config, initrd=tmp_path / "no-initrd"),
        config,
    ):
        with pytest.raises(GuestNotFound):
            await QemuGuest.launch(broken, tmp_path)
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(4096))
    with pytest.raises(QemuError, match="not found"):
        await QemuGuest.launch(replace(config, qemu="no-such-qemu"), tmp_path)
    with pytest.raises(QemuError, match="exited"):  # QEMU refuses its arguments
        await QemuGuest.launch(replace(config, extra=("-no-such-option",)), tmp_path)
