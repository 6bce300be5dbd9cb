"""Attaching to a running QEMU by its QMP socket (``xmig migrate --qemu-qmp``): what is learned
of it, and the typed refusals (no socket, not QEMU, missing capability, disk format, disk
gone). The QEMUs here are started paused (``-S``): nothing needs the guest to boot."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from xmig.errors import (
    DiskFormatError,
    DiskNotFound,
    GuestNotFound,
    QemuError,
)
from xmig.guest.qemu import QemuConfig, QemuGuest
from xmig.guest.qemu.attach import (
    NEEDED_CAPABILITIES,
    NEEDED_COMMANDS,
    attach_qemu,
    missing_features,
    option,
)
from xmig.guest.qemu.image import GuestImage

pytestmark = [pytest.mark.qemu]


def config(image: GuestImage, tmp: Path, **kw: Any) -> QemuConfig:
    return QemuConfig(kernel=image.kernel, initrd=image.initrd, append="xmig.workload=mem x=1",
                      ram_mb=64, smp=2, name="vm7", extra=("-S", *kw.pop("extra", ())), **kw)


def raw_disk(path: Path, size: int = 8 << 20) -> Path:
    path.touch()
    os.truncate(path, size)
    return path


async def test_attach_learns_the_guest_from_qmp_and_its_command_line(
        guest_image: GuestImage, tmp_path: Path) -> None:
    disk = raw_disk(tmp_path / "disk.raw")
    async with await QemuGuest.launch(config(guest_image, tmp_path, disk=disk),
                                      tmp_path / "own") as running:
        qmp = running.qmp_socket
        # QEMU serves one QMP client at a time: the launcher's connection goes first
        await running.detach()
        attached = await attach_qemu(qmp, workdir=tmp_path / "mig")
        try:
            assert not (tmp_path / "mig").exists()  # attaching creates nothing
            c = attached.config
            assert (c.ram_mb, c.smp, c.name) == (64, 2, "vm7")
            assert c.append == "xmig.workload=mem x=1"
            assert c.mem_path == running.mem_path and c.disk == disk
            assert (c.kernel, c.initrd) == (guest_image.kernel.resolve(),
                                            guest_image.initrd.resolve())
            assert (attached.disk_device, attached.disk_bytes) == ("d0", 8 << 20)
            assert attached.serial_log == running.serial_log
            assert attached.pid == running.pid
            assert await attached.status() == "prelaunch"  # attaching changed nothing
        finally:
            await attached.quit()
        assert await asyncio.to_thread(_wait, running) == 0


def _wait(guest: QemuGuest) -> int | None:
    assert guest._proc is not None  # the test owns the process
    return guest._proc.wait(10)


async def test_a_missing_socket_and_one_nobody_listens_on_are_guest_not_found(
        tmp_path: Path) -> None:
    with pytest.raises(GuestNotFound, match="not found"):
        await attach_qemu(tmp_path / "none.qmp", workdir=tmp_path)
    stale = tmp_path / "stale.qmp"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listening: connect is refused
        with pytest.raises(GuestNotFound, match="nothing listens"):
            await attach_qemu(stale, workdir=tmp_path)


async def test_a_socket_that_is_not_qmp_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "web.sock"

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(greet, path=str(path))
    async with server:
        with pytest.raises(QemuError, match="not a QEMU QMP socket: it answered with "
                           "something that is not a QMP greeting"):
            await attach_qemu(path, workdir=tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_a_qemu_without_a_needed_command_or_capability_is_named() -> None:
    """What attach_qemu raises QemuCapabilityError with (a QEMU 2.10 lacks both)."""
    commands = set(NEEDED_COMMANDS) - {"blockdev-mirror"}
    assert missing_features(commands, {"events", "return-path"}) == [
        "blockdev-mirror", "capability pause-before-switchover"]
    assert missing_features(set(NEEDED_COMMANDS), set(NEEDED_CAPABILITIES)) == []


async def test_a_disk_not_raw_or_qcow2_is_refused(guest_image: GuestImage,
                                                  tmp_path: Path) -> None:
    vmdk = tmp_path / "disk.vmdk"
    await asyncio.to_thread(subprocess.run, ["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk),
                                             "8M"], check=True)
    drive = ("-drive", f"file={vmdk},format=vmdk,if=none,id=d0",
             "-device", "virtio-blk-pci,drive=d0")
    async with await QemuGuest.launch(config(guest_image, tmp_path, extra=drive),
                                      tmp_path / "own") as running:
        await running.detach()
        with pytest.raises(DiskFormatError, match="vmdk, not raw or qcow2"):
            await attach_qemu(running.qmp_socket, workdir=tmp_path)


async def test_a_qcow2_disk_is_taken_at_its_virtual_size(guest_image: GuestImage,
                                                         tmp_path: Path) -> None:
    qcow2 = tmp_path / "disk.qcow2"
    await asyncio.to_thread(subprocess.run, ["qemu-img", "create", "-q", "-f", "qcow2",
                                             str(qcow2), "24M"], check=True)
    drive = ("-drive", f"file={qcow2},format=qcow2,if=none,id=d0",
             "-device", "virtio-blk-pci,drive=d0")
    async with await QemuGuest.launch(config(guest_image, tmp_path, extra=drive),
                                      tmp_path / "own") as running:
        await running.detach()
        attached = await attach_qemu(running.qmp_socket, workdir=tmp_path)
        try:
            assert attached.disk_bytes == 24 << 20 and attached.config.disk == qcow2
        finally:
            await attached.detach()


async def test_a_disk_whose_file_is_gone_is_disk_not_found(guest_image: GuestImage,
                                                           tmp_path: Path) -> None:
    disk = raw_disk(tmp_path / "disk.raw")
    async with await QemuGuest.launch(config(guest_image, tmp_path, disk=disk),
                                      tmp_path / "own") as running:
        await running.detach()
        disk.unlink()  # QEMU keeps its descriptor; the file is gone for a mirror's size
        with pytest.raises(DiskNotFound, match="not found"):
            await attach_qemu(running.qmp_socket, workdir=tmp_path)


def test_option_takes_the_last_value() -> None:
    argv = ["qemu", "-name", "a", "-append", "x=1", "--name", "b"]
    assert option(argv, "-name") == "b" and option(argv, "-append") == "x=1"
    assert option(argv, "-kernel") is None
