"""The fault matrix for QEMU guests (issue 9, section 3): the reference guest's
(``tests/test_faults.py``) on the same engine, with real QEMU processes over the emulated
WAN. A fault fires at the first source event of a phase:

    phases  pre-copy (4 MB of QEMU's stream sent), blackout (the source paused,
            ``migrate-continue`` given: QEMU's last pass flows), before GO (READY received
            and the RAM checked: GO is journaled next)
    faults  link cut for good, link stalled 1.5 s (the session resumes), a corrupted TLS
            record, the destination agent killed (its task and its QEMU, as a power loss)

A killed destination is not restarted here: ``tests/guest/qemu/test_restart.py`` kills and
restarts a real agent process and its QEMU. Which cells: the destination killed only before
READY (after it, the source is in doubt and waits for a restarted agent: ``test_restart.py``,
``test_settle.py``);
the link cut before GO (GO crosses a dead link: both sides in doubt) is
``test_settle.py``'s first test. Negotiate is left out: no QEMU runs on the destination yet,
the reference guest's cells cover that step of the engine.

After each cell: exactly one side runs; the source's disk (or the destination's, when it
runs) holds every record the guest wrote; a side that does not run left nothing behind: no
QEMU process, no image, journal DISCARDED.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from xmig.errors import ConnectionClosed, MigrationAborted, XmigError
from xmig.events import Event
from xmig.guest.qemu import QemuConfig, QemuGuest, check_records
from xmig.guest.qemu.image import GuestImage
from xmig.guest.qemu.migrate import QemuMigrationOptions, QemuSourceResult
from xmig.guest.qemu.receive import QemuDestResult
from xmig.netem import Wan
from xmig.netem.sessions import connect_across, listen_across
from xmig.orchestrator.run import migrate_qemu, receive_qemu
from xmig.protocol.journal import Journal
from xmig.transport import SessionConfig, TransportSession
from xmig.transport.certs import init_pki
from xmig.transport.tls import client_context, server_context

from .helpers import kill_qemus_under
from .test_faults import DISK, source_disk
from .test_migrate import BOOT_S, LINK, drain_console, guest_config

pytestmark = [pytest.mark.root, pytest.mark.qemu, pytest.mark.slow]

#: a cut session gives up after 1 s idle + 2 s resume deadline; a 1.5 s stall resumes
SESSION = SessionConfig(idle_timeout=1.0, resume_deadline=2.0)
STALL_S = 1.5
CELL_S = 90.0  #: one cell, start to end


@dataclass
class Rig:
    wan: Wan
    src_session: TransportSession
    dst_session: TransportSession
    dst_dir: Path
    dst_task: asyncio.Task[QemuDestResult] | None = None
    fired: list[dict[str, Any]] = field(default_factory=list)


Fault = Callable[[Rig], None]


def cut_link(rig: Rig) -> None:
    rig.wan.cut()


def stall_link(rig: Rig) -> None:
    rig.wan.cut()
    asyncio.get_running_loop().call_later(STALL_S, rig.wan.restore)


def corrupt_frame(rig: Rig) -> None:
    """A TLS record of seeded garbage under one of the source's connections' TLS."""
    conn = next(iter(rig.src_session._conns.values()))
    assert conn.transport is not None
    sock = conn.transport.get_extra_info("socket")
    os.write(sock.fileno(), b"\x17\x03\x03\x00\x40" + random.Random(9).randbytes(64))


def kill_destination(rig: Rig) -> None:
    """The destination host loses power: its agent's task and its QEMU die at once."""
    assert rig.dst_task is not None
    kill_qemus_under(rig.dst_dir)
    rig.dst_task.cancel()
    rig.dst_session.session.fail(ConnectionClosed("destination agent killed"))
    rig.dst_session._after_io()


def in_precopy(event: dict[str, Any]) -> bool:
    sent = event.get("stream", {}).get("sent", {}).get("bytes", 0)
    return bool(event["event"] == "progress" and sent > 4_000_000)


def in_blackout(event: dict[str, Any]) -> bool:
    return bool(event["event"] == "blackout" and event.get("step") == "migrate-continue")


def before_go(event: dict[str, Any]) -> bool:
    return bool(event["event"] == "blackout" and event.get("step") == "ram checked")


PHASES = {"precopy": in_precopy, "blackout": in_blackout, "before-go": before_go}
FAULTS = {"cut": cut_link, "stall": stall_link, "corrupt": corrupt_frame,
          "kill-dst": kill_destination}
CELLS = [pytest.param(f, p, id=f"{f}-{p}") for f in FAULTS for p in PHASES
         if not (p == "before-go" and f in ("cut", "kill-dst"))]


@dataclass
class Ended:
    src: QemuSourceResult | BaseException
    dst: QemuDestResult | BaseException
    fired: list[dict[str, Any]]
    src_journal: list[str]
    dst_journal: list[str]


async def migrate_with_fault(tmp: Path, source: QemuGuest, template: QemuConfig,
                             fault: Fault, trigger: Callable[[dict[str, Any]], bool]) -> Ended:
    src_dir, dst_dir = tmp / "src", tmp / "dst"
    with Wan(LINK) as wan:
        pki = init_pki(tmp / "pki", server_names=(wan.dst_addr, "127.0.0.1"))
        async with (listen_across(wan, tls=server_context(pki), config=SESSION) as lst,
                    connect_across(wan, lst.port, tls=client_context(pki), streams=2,
                                   config=SESSION) as session):
            rig = Rig(wan, session, await lst.accept(), dst_dir)

            def on_progress(event: Event) -> None:
                data = event.to_json()
                if not rig.fired and trigger(data):
                    rig.fired.append(data)
                    fault(rig)

            rig.dst_task = asyncio.create_task(receive_qemu(
                rig.dst_session, template, workdir=dst_dir,
                journal=Journal(dst_dir / "journal"), reply_timeout_s=30))
            src_task = asyncio.create_task(migrate_qemu(
                session, source, migration="q1", journal=Journal(src_dir / "journal"),
                workdir=src_dir, on_progress=on_progress,
                options=QemuMigrationOptions(reply_timeout_s=15, blackout_timeout_s=8)))
            async with asyncio.timeout(CELL_S):
                src, dst = await asyncio.gather(src_task, rig.dst_task,
                                                return_exceptions=True)
    return Ended(src, dst, rig.fired,
                 [r.kind for r in Journal(src_dir / "journal").records()],
                 [r.kind for r in Journal(dst_dir / "journal").records()])


async def assert_the_source_runs_with_its_records(source: QemuGuest, disk: Path) -> None:
    assert await source.status() == "running"
    now = await source.wait_for_progress(10)
    await source.wait_for_progress(10, min_counter=now.counter + 1)
    assert await source.execute("query-block-jobs") == []
    await source.stop()
    last = await drain_console(source)
    check = check_records(disk, last.disk_seq, area=DISK)
    assert check.ok and check.checked > 0, check


@pytest.mark.parametrize(("fault", "phase"), CELLS)
async def test_a_fault_at_each_phase_leaves_exactly_one_side_running(
        guest_image: GuestImage, tmp_path: Path, fault: str, phase: str) -> None:
    disk = source_disk(tmp_path)
    config = guest_config(guest_image, "memdisk", disk=disk, mem_mb=16, mem_rate=2,
                          disk_rate=0.5)
    async with await QemuGuest.launch(config, tmp_path / "src") as source:
        await source.wait_for_progress(BOOT_S, min_counter=1)
        started = time.monotonic()
        try:
            out = await migrate_with_fault(tmp_path, source,
                                           guest_config(guest_image, "memdisk", name="dst"),
                                           FAULTS[fault], PHASES[phase])
        except BaseException:
            kill_qemus_under(tmp_path / "dst")
            raise
        print(f"\n{fault} at {phase}: src {type(out.src).__name__} dst "
              f"{type(out.dst).__name__} in {time.monotonic() - started:.1f} s, journals "
              f"{out.src_journal} {out.dst_journal}")
        assert out.fired, "the fault never fired"
        if isinstance(out.src, QemuSourceResult) and out.src.status == "done":
            # absorbed: the destination runs the guest, the source never will again
            assert isinstance(out.dst, QemuDestResult) and out.dst.guest is not None
            try:
                assert fault in ("stall", "corrupt"), "a dead peer cannot complete"
                assert out.src_journal == ["START", "GO"]
                assert out.dst_journal == ["READY", "RUNNING"]
                assert await source.status() == "postmigrate"
                assert await out.dst.guest.status() == "running"
                before = await drain_console(source)
                after = await out.dst.guest.wait_for_progress(30, min_counter=before.counter)
                assert after.counter >= before.counter
                assert out.dst.image is not None
                check = check_records(out.dst.image, before.disk_seq, area=DISK)
                assert check.ok and check.checked > 0, check
            finally:
                await out.dst.guest.quit()
            return
        # aborted before GO: the source runs on, the destination left nothing behind
        leftover = kill_qemus_under(tmp_path / "dst")
        assert isinstance(out.src, MigrationAborted), out.src
        assert isinstance(out.dst, XmigError | asyncio.CancelledError), out.dst
        assert out.src_journal == ["START", "ABORT"]
        assert "GO" not in out.src_journal and "RUNNING" not in out.dst_journal
        if fault != "kill-dst":  # a killed agent journals nothing more
            assert out.dst_journal[-1:] == ["DISCARDED"], out.dst_journal
            assert leftover == [], "the destination's QEMU must have quit"
        if fault != "kill-dst":  # a killed agent's directory is cleaned when it restarts
            assert not (tmp_path / "dst" / "disk.raw").exists()
        await assert_the_source_runs_with_its_records(source, disk)
