"""The QEMU destination runs the same cleanup for any failure while it prepares, typed or
not: the source hears REFUSED, nothing is left in its workdir but the journal's DISCARDED.
(The steps before QEMU starts; a QEMU that dies or fails later is in test_faults.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.inject import after, instead
from tests.transport.stacks import make_stack, session_pair
from xmig.guest.qemu import receive as qemu_receive
from xmig.guest.qemu.machine import QemuConfig
from xmig.orchestrator.run import receive_qemu
from xmig.protocol import control
from xmig.protocol.journal import Journal
from xmig.storage.engine import DiskReceiver
from xmig.storage.raw import RawFileBackend
from xmig.transport import Channel

TOKEN = "d1" * 16
MiB = 1 << 20


STEPS: dict[str, Callable[[pytest.MonkeyPatch, BaseException], None]] = {
    "check_resources": lambda mp, e: mp.setattr(qemu_receive, "check_resources",
                                                instead(e)),
    "image": lambda mp, e: mp.setattr(RawFileBackend, "create", instead(e)),
    "disk receiver": lambda mp, e: mp.setattr(DiskReceiver, "start",
                                              after(DiskReceiver.start, e)),
}


@pytest.mark.parametrize("exc_type", [MemoryError, IndexError])
@pytest.mark.parametrize("step", [*sorted(STEPS), "launch"])
async def test_a_failure_at_each_step_before_qemu_runs_is_cleaned_up_and_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str,
        exc_type: type[BaseException]) -> None:
    exc = exc_type("injected")
    launch = instead(exc) if step == "launch" else None
    if step in STEPS:
        STEPS[step](monkeypatch, exc)

    async def never(config: QemuConfig) -> Any:
        raise AssertionError("QEMU must not be launched")

    workdir = tmp_path / "dst"
    template = QemuConfig(kernel=tmp_path / "k", initrd=tmp_path / "i", append="", name="guest")
    msg = control.Negotiate("q1", 1, control.QemuGuest(control.QemuSpec(ram_mb=16)),
                            4 * MiB, 16 * MiB, TOKEN)
    with make_stack("plain", tmp_path) as stack:
        async with session_pair(stack) as (src, dst):
            receiving = asyncio.create_task(receive_qemu(
                dst, template, workdir=workdir, journal=Journal(workdir / "journal"),
                launch=launch or never, reply_timeout_s=20))
            await src.send(Channel.CONTROL, msg.encode())
            async with asyncio.timeout(30):
                reply = control.decode(await src.recv(Channel.CONTROL))
                with pytest.raises(exc_type):
                    await receiving
    assert isinstance(reply, control.Refused) and reply.error == "MigrationError"
    assert "injected" in reply.reason
    assert sorted(p.name for p in workdir.iterdir()) == ["journal"]
    assert [r.kind for r in Journal(workdir / "journal").records()] == ["DISCARDED"]


async def test_a_full_disk_deletes_what_arrived_before_it_journals_discarded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the disk receiver fails as the filesystem fills: DISCARDED cannot be written until
    # the image (what filled it) is deleted
    monkeypatch.setattr(DiskReceiver, "start",
                        after(DiskReceiver.start, OSError(28, "No space left on device")))
    append = Journal.append
    refused: list[str] = []

    def full_until_deleted(self: Journal, kind: str, migration: str, epoch: int,
                           **fields: Any) -> Any:
        if list(self.path.parent.glob("*.raw")):
            refused.append(kind)
            raise OSError(28, "No space left on device")
        return append(self, kind, migration, epoch, **fields)

    monkeypatch.setattr(Journal, "append", full_until_deleted)
    workdir = tmp_path / "dst"
    template = QemuConfig(kernel=tmp_path / "k", initrd=tmp_path / "i", append="", name="guest")
    msg = control.Negotiate("q1", 1, control.QemuGuest(control.QemuSpec(ram_mb=16)),
                            4 * MiB, 16 * MiB, TOKEN)

    async def never(config: QemuConfig) -> Any:
        raise AssertionError("QEMU must not be launched")

    with make_stack("plain", tmp_path) as stack:
        async with session_pair(stack) as (src, dst):
            receiving = asyncio.create_task(receive_qemu(
                dst, template, workdir=workdir, journal=Journal(workdir / "journal"),
                launch=never, reply_timeout_s=20))
            await src.send(Channel.CONTROL, msg.encode())
            async with asyncio.timeout(30):
                reply = control.decode(await src.recv(Channel.CONTROL))
                with pytest.raises(OSError):
                    await receiving
    assert isinstance(reply, control.Refused), reply
    assert refused == ["DISCARDED"]  # refused once, written once the image was gone
    assert sorted(p.name for p in workdir.iterdir()) == ["journal"]
    assert [r.kind for r in Journal(workdir / "journal").records()] == ["DISCARDED"]
