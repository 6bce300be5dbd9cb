"""A QEMU destination host killed (``kill -9`` of its agent) and restarted on the same
workdir and address: real ``xmig`` processes, real QEMU on both sides, TLS, the emulated WAN
(issue 9, section 3: the destination-killed cell, for QEMU as ``tests/test_restart.py`` is
for the reference guest).

The agent's QEMU outlives the agent, as a child of a crashed daemon does; the restarted
agent kills it (its pidfile) before it abandons or discards what it held. Phases:

    pre-copy     4 MB of QEMU's stream sent: the source aborts and runs on; the restarted
                 agent finds the half-received migration and deletes it
    after READY  the source heard READY and journals GO, which takes 200 ms to cross: the
                 agent is gone first. The source keeps its paused copy, in doubt, and tells
                 GO again until the restarted agent answers that it abandoned the epoch;
                 only then does the source resume

After each: the source QEMU runs, its disk holds every record the guest wrote, and the
destination left nothing behind (no QEMU, no image, no RAM file).
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.opsproc import Proc, is_ready, spawn, xmig
from xmig.guest.qemu import QemuGuest, check_records
from xmig.guest.qemu.attach import attach_qemu
from xmig.guest.qemu.image import GuestImage
from xmig.netem import LinkSpec, Wan
from xmig.protocol.journal import Journal

from .helpers import kill_qemus_under, qemus_under
from .test_faults import DISK, source_disk
from .test_migrate import BOOT_S, drain_console, guest_config

pytestmark = [pytest.mark.root, pytest.mark.qemu, pytest.mark.slow]

#: GO takes 200 ms to reach the destination: the kill lands first
LINK = LinkSpec.symmetric(rate_bps=100_000_000, rtt_s=0.4)


def _precopy(e: dict[str, Any]) -> bool:
    sent = e.get("stream", {}).get("sent", {}).get("bytes", 0)
    return bool(e.get("event") == "progress" and sent > 4_000_000)


def _ready_received(e: dict[str, Any]) -> bool:
    return bool(e.get("step") == "ready received")


PHASES: dict[str, Callable[[dict[str, Any]], bool]] = {
    "precopy": _precopy, "after-ready": _ready_received}


async def _expect(proc: Proc, pred: Callable[[dict[str, Any]], bool],
                  timeout: float) -> dict[str, Any]:
    return await asyncio.to_thread(proc.expect, pred, timeout)


@pytest.mark.parametrize("phase", list(PHASES))
async def test_a_destination_agent_killed_and_restarted_leaves_the_source_running(
        guest_image: GuestImage, tmp_path: Path, procs: list[Proc], phase: str) -> None:
    dst = tmp_path / "dst"
    with Wan(LINK) as wan:
        pki = tmp_path / "pki"
        r = await asyncio.to_thread(xmig, "certs", "init", str(pki), "--server-name",
                                    wan.dst_addr)
        assert r.returncode == 0, r.stderr
        agent_argv = ["agent", "--listen", f"{wan.dst_addr}:0", "--pki", str(pki),
                      "--workdir", str(dst), "--json", "--qemu-kernel",
                      str(guest_image.kernel), "--qemu-initrd", str(guest_image.initrd)]
        in_dst = functools.partial(wan.popen, "dst")
        agent = spawn(agent_argv, tmp_path, "agent", in_dst)
        procs.append(agent)
        disk = source_disk(tmp_path)
        config = guest_config(guest_image, "memdisk", disk=disk, name="vm1", mem_mb=16,
                              mem_rate=2, disk_rate=0.5)
        source = await QemuGuest.launch(config, tmp_path / "src",
                                        popen=functools.partial(wan.popen, "src"))
        try:
            await source.wait_for_progress(BOOT_S, min_counter=1)
            await source.detach()  # migrate attaches to its QMP
            port = (await _expect(agent, is_ready("agent"), 30))["port"]
            mig = spawn(["migrate", "--qemu-qmp", str(source.qmp_socket), "--to",
                         f"{wan.dst_addr}:{port}", "--pki", str(pki), "--json", "--workdir",
                         str(tmp_path / "src-xmig"), "--max-downtime", "1s"],
                        tmp_path, "migrate", functools.partial(wan.popen, "src"))
            procs.append(mig)

            await _expect(mig, PHASES[phase], 240)
            agent.popen.send_signal(signal.SIGKILL)
            await asyncio.to_thread(agent.popen.wait, 10)
            [incoming] = list(dst.glob("incoming-*"))
            if phase == "after-ready":
                # the paused guest's QEMU outlives its agent, in doubt
                assert qemus_under(incoming), "the destination's QEMU should outlive its agent"
                assert [r.kind for r in Journal(incoming / "journal").records()] == ["READY"]

            again = spawn([*agent_argv[:2], f"{wan.dst_addr}:{port}", *agent_argv[3:]],
                          tmp_path, "agent2", in_dst)
            procs.append(again)
            if phase == "after-ready":
                abandoned = await _expect(again, lambda e: e.get("event") == "abandoned", 30)
                assert abandoned["migration"] == "vm1"
            await _expect(again, is_ready("agent"), 30)
            # what the killed agent left is gone: its QEMU, its image, its RAM file
            assert qemus_under(dst) == []
            assert not incoming.exists() or sorted(p.name for p in incoming.iterdir()) == [
                "journal"]

            rc = await asyncio.to_thread(mig.wait, 180)
            err = mig.stderr.read_text()
            assert rc == 3, err  # not migrated: the source runs on
            if phase == "after-ready":
                # it told GO again until the restarted agent answered: abandoned
                assert "xmig: EpochAbandoned:" in err and "runs on" in err, err
                kinds = [json.loads(line)["kind"] for line in
                         (tmp_path / "src-xmig" / "journal").read_text().splitlines()]
                assert kinds[-2:] == ["GO", "ABANDONED"], kinds
                answered = await _expect(again, lambda e: e.get("event") == "answered", 10)
                assert answered["error"] == "EpochAbandoned"

            # the source runs on, and its disk holds every record its guest wrote
            view = await attach_qemu(source.qmp_socket, workdir=tmp_path / "view")
            try:
                assert await view.status() == "running"
                await view.stop()
            finally:
                await view.detach()
            last = await drain_console(source)
            check = check_records(disk, last.disk_seq, area=DISK)
            assert check.ok and check.checked > 0, check
        finally:
            await source.quit()
            kill_qemus_under(dst)
        again.popen.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(again.wait, 30) == 0
