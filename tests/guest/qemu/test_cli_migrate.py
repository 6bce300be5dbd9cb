"""``xmig migrate --qemu-qmp`` and ``xmig agent --qemu-kernel``: a running QEMU that xmig did
not start is migrated by operator processes across the emulated WAN (issue 4, section 3).

The source QEMU runs in the emulator's source namespace (launched here, then let go: its QMP
is free); ``xmig migrate`` attaches to it from that namespace; the agent in the destination
namespace starts the destination QEMU and hosts it until it quits."""

from __future__ import annotations

import asyncio
import functools
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.guest.qemu.helpers import kill_qemus_under
from tests.opsproc import Proc, is_ready, spawn, xmig
from xmig.guest.qemu import QemuConfig, QemuGuest
from xmig.guest.qemu.attach import attach_qemu
from xmig.guest.qemu.image import GuestImage, guest_cmdline
from xmig.netem import LinkSpec, Wan

pytestmark = [pytest.mark.root, pytest.mark.qemu, pytest.mark.slow]

MiB = 1 << 20


def _report(e: dict[str, Any]) -> bool:
    return "status" in e and "event" not in e


async def test_migrate_attaches_to_a_running_qemu_and_the_agent_hosts_it(
        guest_image: GuestImage, tmp_path: Path, procs: list[Proc]) -> None:
    with Wan(LinkSpec.symmetric(rate_bps=100_000_000, rtt_s=0.02)) as wan:
        pki = tmp_path / "pki"
        r = await asyncio.to_thread(xmig, "certs", "init", str(pki), "--server-name",
                                    wan.dst_addr)
        assert r.returncode == 0, r.stderr
        agent = spawn(["agent", "--listen", f"{wan.dst_addr}:0", "--pki", str(pki),
                       "--workdir", str(tmp_path / "dst"), "--once", "--json",
                       "--qemu-kernel", str(guest_image.kernel),
                       "--qemu-initrd", str(guest_image.initrd)],
                      tmp_path, "agent", functools.partial(wan.popen, "dst"))
        procs.append(agent)
        disk = tmp_path / "vm1.raw"
        disk.touch()
        os.truncate(disk, 32 * MiB)
        config = QemuConfig(kernel=guest_image.kernel, initrd=guest_image.initrd, disk=disk,
                            ram_mb=128, name="vm1",
                            append=guest_cmdline("memdisk", report_ms=100, mem_mb=16,
                                                 mem_rate=4, disk_rate=1))
        async with await QemuGuest.launch(config, tmp_path / "src",
                                          popen=functools.partial(wan.popen, "src")) as source:
            before = await source.wait_for_progress(60, min_counter=1)
            await source.detach()  # an operator's QEMU: xmig migrate attaches to its QMP
            port = (await asyncio.to_thread(agent.expect, is_ready("agent"), 30))["port"]
            # the forecast first: it reads the guest and probes the link, and is not the
            # --once agent's migration
            plan_run = spawn(["migrate", "--qemu-qmp", str(source.qmp_socket), "--to",
                              f"{wan.dst_addr}:{port}", "--pki", str(pki), "--json", "--plan",
                              "--plan-time", "1s", "--max-downtime", "500ms"],
                             tmp_path, "plan", functools.partial(wan.popen, "src"))
            procs.append(plan_run)
            plan = await asyncio.to_thread(plan_run.expect, lambda e: "converges" in e, 60)
            assert await asyncio.to_thread(plan_run.wait, 30) == 0, plan_run.stderr.read_text()
            assert plan["converges"] is True and plan["total_s"] > 0
            assert 0.25 * 12.5e6 < plan["link_probe"]["rate_Bps"] < 1.1 * 12.5e6
            guest = plan["guest"]
            assert guest["ram_bytes"] == 128 * MiB and guest["disk_write_Bps"] > 0
            assert guest["dirty_Bps"] > 0 and 0 < guest["first_pass_ratio"] < 1
            assert not (tmp_path / "src-xmig").exists()  # a plan creates nothing
            mig = spawn(["migrate", "--qemu-qmp", str(source.qmp_socket),
                         "--to", f"{wan.dst_addr}:{port}", "--pki", str(pki), "--json",
                         "--workdir", str(tmp_path / "src-xmig"), "--max-downtime", "500ms"],
                        tmp_path, "migrate", functools.partial(wan.popen, "src"))
            procs.append(mig)
            report = await asyncio.to_thread(mig.expect, _report, 240)
            assert await asyncio.to_thread(mig.wait, 30) == 0, mig.stderr.read_text()
            assert report["status"] == "done" and report["backend"] == "qemu"
            assert 0 < report["downtime_ms"] < 10_000 and report["wire_bytes"] > 32 * MiB
            assert report["source"] == "quit"
            events = [e.get("event") for e in mig.seen]
            assert "attached" in events and "progress" in events
            # the source QEMU was told to quit: it never runs again
            assert source.pid is not None
            assert await asyncio.to_thread(os.waitpid, source.pid, 0)
            # the destination agent hosts the guest; its counter went on from the source's
            hosting = await asyncio.to_thread(
                agent.expect, lambda e: e.get("event") == "hosting", 30)
            dest = await attach_qemu(Path(hosting["qmp"]), workdir=tmp_path / "dst-view")
            try:
                assert await dest.status() == "running"
                after = await dest.wait_for_progress(30, min_counter=before.counter + 1)
                assert after.counter > before.counter
            finally:
                await dest.quit()
            # the guest quit there: the --once agent is done
            assert await asyncio.to_thread(agent.wait, 30) == 0


async def test_an_agent_not_told_how_to_start_qemu_refuses_and_the_source_runs_on(
        guest_image: GuestImage, tmp_path: Path, procs: list[Proc]) -> None:
    pki = tmp_path / "pki"
    r = await asyncio.to_thread(xmig, "certs", "init", str(pki), "--server-name", "127.0.0.1")
    assert r.returncode == 0, r.stderr
    agent = spawn(["agent", "--listen", "127.0.0.1:0", "--pki", str(pki), "--workdir",
                   str(tmp_path / "dst"), "--once", "--json"], tmp_path, "agent")
    procs.append(agent)
    config = QemuConfig(kernel=guest_image.kernel, initrd=guest_image.initrd, ram_mb=128,
                        name="vm2", append=guest_cmdline("mem", report_ms=100, mem_mb=8,
                                                         mem_rate=2))
    async with await QemuGuest.launch(config, tmp_path / "src") as source:
        first = await source.wait_for_progress(60, min_counter=1)
        await source.detach()
        port = (await asyncio.to_thread(agent.expect, is_ready("agent"), 30))["port"]
        r = await asyncio.to_thread(
            xmig, "migrate", "--qemu-qmp", str(source.qmp_socket), "--to", f"127.0.0.1:{port}",
            "--pki", str(pki), "--workdir", str(tmp_path / "src-xmig"), timeout=60)
        assert r.returncode == 3, r.stderr
        assert "ConfigError" in r.stderr and "--qemu-kernel" in r.stderr
        dest = await attach_qemu(source.qmp_socket, workdir=tmp_path / "view")
        try:
            assert await dest.status() == "running"  # untouched: it runs on
            later = await dest.wait_for_progress(30, min_counter=first.counter + 5)
            assert later.counter > first.counter
        finally:
            await dest.detach()


async def test_an_abort_the_destination_did_not_hear_is_told_once_the_link_is_back(
        guest_image: GuestImage, tmp_path: Path, procs: list[Proc]) -> None:
    # READY takes 200 ms to reach the source: the cut lands first. The source aborts at its
    # 2 s blackout deadline and runs on; its ABORT cannot cross until the link is back
    with Wan(LinkSpec.symmetric(rate_bps=100_000_000, rtt_s=0.4)) as wan:
        pki = tmp_path / "pki"
        r = await asyncio.to_thread(xmig, "certs", "init", str(pki), "--server-name",
                                    wan.dst_addr)
        assert r.returncode == 0, r.stderr
        agent = spawn(["agent", "--listen", f"{wan.dst_addr}:0", "--pki", str(pki),
                       "--workdir", str(tmp_path / "dst"), "--once", "--json",
                       "--qemu-kernel", str(guest_image.kernel),
                       "--qemu-initrd", str(guest_image.initrd)],
                      tmp_path, "agent", functools.partial(wan.popen, "dst"))
        procs.append(agent)
        config = QemuConfig(kernel=guest_image.kernel, initrd=guest_image.initrd, ram_mb=128,
                            name="vm3", append=guest_cmdline("mem", report_ms=100, mem_mb=8,
                                                             mem_rate=2))
        async with await QemuGuest.launch(config, tmp_path / "src",
                                          popen=functools.partial(wan.popen, "src")) as source:
            first = await source.wait_for_progress(60, min_counter=1)
            await source.detach()
            port = (await asyncio.to_thread(agent.expect, is_ready("agent"), 30))["port"]
            mig = spawn(["migrate", "--qemu-qmp", str(source.qmp_socket),
                         "--to", f"{wan.dst_addr}:{port}", "--pki", str(pki), "--json",
                         "--workdir", str(tmp_path / "src-xmig"), "--max-downtime", "1s",
                         "--blackout-timeout", "2s"],
                        tmp_path, "migrate", functools.partial(wan.popen, "src"))
            procs.append(mig)
            await asyncio.to_thread(
                agent.expect, lambda e: e.get("event") == "phase" and e.get("phase") == "ready",
                240)
            wan.cut()
            retry = await asyncio.to_thread(
                mig.expect, lambda e: e.get("event") == "abort-retry", 60)
            assert "error" in retry
            wan.restore()
            await asyncio.to_thread(
                agent.expect, lambda e: e.get("event") == "superseded", 60)
            done = await asyncio.to_thread(
                mig.expect, lambda e: e.get("event") == "abort-delivered", 60)
            assert done["note"] == "the destination discarded its copy", done
            assert await asyncio.to_thread(mig.wait, 30) == 3, mig.stderr.read_text()
            assert "blackout passed its deadline of 2 s" in mig.stderr.read_text()
            # the destination discarded its paused QEMU: the --once agent is done (1)
            assert await asyncio.to_thread(agent.wait, 30) == 1
            assert not list((tmp_path / "dst").rglob("disk.raw"))
            # and the source QEMU runs on
            again = await attach_qemu(source.qmp_socket, workdir=tmp_path / "view")
            try:
                assert await again.status() == "running"
                later = await again.wait_for_progress(30, min_counter=first.counter + 5)
                assert later.counter > first.counter
            finally:
                await again.detach()


async def test_a_source_qemu_in_doubt_is_listed_and_forced_to_abort_by_xmig_resolve(
        guest_image: GuestImage, tmp_path: Path, procs: list[Proc]) -> None:
    # GO takes 200 ms to reach the destination: its site is gone (kill -9) first
    with Wan(LinkSpec.symmetric(rate_bps=100_000_000, rtt_s=0.4)) as wan:
        pki = tmp_path / "pki"
        r = await asyncio.to_thread(xmig, "certs", "init", str(pki), "--server-name",
                                    wan.dst_addr)
        assert r.returncode == 0, r.stderr
        agent = spawn(["agent", "--listen", f"{wan.dst_addr}:0", "--pki", str(pki),
                       "--workdir", str(tmp_path / "dst"), "--json",
                       "--qemu-kernel", str(guest_image.kernel),
                       "--qemu-initrd", str(guest_image.initrd)],
                      tmp_path, "agent", functools.partial(wan.popen, "dst"))
        procs.append(agent)
        config = QemuConfig(kernel=guest_image.kernel, initrd=guest_image.initrd, ram_mb=128,
                            name="vm4", append=guest_cmdline("mem", report_ms=100, mem_mb=8,
                                                             mem_rate=2))
        work = tmp_path / "src-xmig"
        async with await QemuGuest.launch(config, tmp_path / "src",
                                          popen=functools.partial(wan.popen, "src")) as source:
            first = await source.wait_for_progress(60, min_counter=1)
            await source.detach()
            port = (await asyncio.to_thread(agent.expect, is_ready("agent"), 30))["port"]
            mig = spawn(["migrate", "--qemu-qmp", str(source.qmp_socket),
                         "--to", f"{wan.dst_addr}:{port}", "--pki", str(pki), "--json",
                         "--workdir", str(work), "--max-downtime", "1s"],
                        tmp_path, "migrate", functools.partial(wan.popen, "src"))
            procs.append(mig)
            await asyncio.to_thread(
                mig.expect, lambda e: e.get("step") == "ready received", 240)
            agent.popen.kill()
            await asyncio.to_thread(agent.popen.wait, 10)
            kill_qemus_under(tmp_path / "dst")  # the site's power is gone: its QEMU too
            # no RESUMED within the reply timeout (60 s): in doubt, it tells GO again
            await asyncio.to_thread(
                mig.expect, lambda e: e.get("note", "").startswith("in doubt"), 90)
            await asyncio.to_thread(
                mig.expect, lambda e: e.get("event") == "settle-retry", 60)
            r = await asyncio.to_thread(xmig, "resolve", "--workdir", str(work), "--json")
            assert r.returncode == 0, r.stderr
            [doubt] = [json.loads(line) for line in r.stdout.splitlines()]
            assert (doubt["migration"], doubt["role"], doubt["backend"]) == (
                "vm4", "source", "qemu"), doubt
            assert doubt["ctl"] == str(work / "vm4.ctl")
            r = await asyncio.to_thread(xmig, "resolve", "--workdir", str(work), "--migration",
                                        "vm4", "--force", "abort", "--yes", "--json")
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["state"] == "running"
            assert await asyncio.to_thread(mig.wait, 30) == 3, mig.stderr.read_text()
            assert "forced abort by an operator" in mig.stderr.read_text()
            kinds = [json.loads(line)["kind"]
                     for line in (work / "journal").read_text().splitlines()]
            assert kinds[-2:] == ["GO", "FORCED"], kinds
            assert not (work / "vm4.ctl").exists()
            again = await attach_qemu(source.qmp_socket, workdir=tmp_path / "view")
            try:
                assert await again.status() == "running"
                later = await again.wait_for_progress(30, min_counter=first.counter + 5)
                assert later.counter > first.counter
            finally:
                await again.detach()


async def test_a_qemu_guest_that_migrates_onward_leaves_no_image_behind(
        guest_image: GuestImage, tmp_path: Path, procs: list[Proc]) -> None:
    """Source -> agent B -> agent A: B deletes its copy of the disk once the guest left by
    migration (its own monitor saw the outgoing migration complete, no RESUME after); A,
    whose guest is simply quit, keeps its image."""
    with Wan(LinkSpec.symmetric(rate_bps=200_000_000, rtt_s=0.02)) as wan:
        pki = tmp_path / "pki"
        r = await asyncio.to_thread(xmig, "certs", "init", str(pki), "--server-name",
                                    wan.src_addr, "--server-name", wan.dst_addr)
        assert r.returncode == 0, r.stderr
        agents = {}
        for side, addr in (("src", wan.src_addr), ("dst", wan.dst_addr)):
            agents[side] = spawn(["agent", "--listen", f"{addr}:0", "--pki", str(pki),
                                  "--workdir", str(tmp_path / f"agent-{side}"), "--json",
                                  "--qemu-kernel", str(guest_image.kernel),
                                  "--qemu-initrd", str(guest_image.initrd)],
                                 tmp_path, f"agent-{side}", functools.partial(wan.popen, side))
            procs.append(agents[side])
        ports = {side: (await asyncio.to_thread(a.expect, is_ready("agent"), 30))["port"]
                 for side, a in agents.items()}
        disk = tmp_path / "vm5.raw"
        disk.touch()
        os.truncate(disk, 16 * MiB)
        config = QemuConfig(kernel=guest_image.kernel, initrd=guest_image.initrd, disk=disk,
                            ram_mb=128, name="vm5",
                            append=guest_cmdline("memdisk", report_ms=100, mem_mb=8,
                                                 mem_rate=2, disk_rate=1))

        async def migrate(qmp: Path, side: str, to: str, label: str) -> None:
            mig = spawn(["migrate", "--qemu-qmp", str(qmp), "--to", f"{to}:{ports[side]}",
                         "--pki", str(pki), "--json", "--workdir", str(tmp_path / label),
                         "--max-downtime", "1s"], tmp_path, label,
                        functools.partial(wan.popen, "src" if side == "dst" else "dst"))
            procs.append(mig)
            assert await asyncio.to_thread(mig.wait, 240) == 0, mig.stderr.read_text()

        async with await QemuGuest.launch(config, tmp_path / "src",
                                          popen=functools.partial(wan.popen, "src")) as source:
            await source.wait_for_progress(60, min_counter=1)
            await source.detach()
            await migrate(source.qmp_socket, "dst", wan.dst_addr, "mig-1")
        on_b = await asyncio.to_thread(
            agents["dst"].expect, lambda e: e.get("event") == "hosting", 30)
        await migrate(Path(on_b["qmp"]), "src", wan.src_addr, "mig-2")
        left_b = await asyncio.to_thread(
            agents["dst"].expect, lambda e: e.get("event") == "exit" and "migrated" in e, 60)
        assert left_b["migrated"] is True, left_b
        assert not (Path(on_b["dir"]) / "disk.raw").exists()
        assert (Path(on_b["dir"]) / "journal").exists()  # what happened stays journaled

        on_a = await asyncio.to_thread(
            agents["src"].expect, lambda e: e.get("event") == "hosting", 30)
        dest = await attach_qemu(Path(on_a["qmp"]), workdir=tmp_path / "view")
        await dest.quit()  # an operator shuts it down: its disk is kept
        left_a = await asyncio.to_thread(
            agents["src"].expect, lambda e: e.get("event") == "exit" and "migrated" in e, 60)
        assert left_a["migrated"] is False, left_a
        assert (Path(on_a["dir"]) / "disk.raw").exists()
