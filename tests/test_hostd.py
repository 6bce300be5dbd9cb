"""A migration as separate operator processes: ``xmig guest start`` on the source host,
``xmig agent`` on the destination, ``xmig migrate`` asking for it; real processes, TLS, and
(for the end-to-end test) the emulated WAN between network namespaces."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tests.opsproc import Proc, is_ready, spawn, start_pair, status, xmig
from xmig.netem import LinkSpec, Wan, tun_available
from xmig.orchestrator.report import REPORT_KEYS


@pytest.mark.root
@pytest.mark.skipif(not tun_available(), reason="needs root and /dev/net/tun")
def test_guest_migrates_between_processes_across_the_wan(
    tmp_path: Path, procs: list[Proc]
) -> None:
    with Wan(LinkSpec.symmetric(rate_bps=200_000_000, rtt_s=0.02)) as wan:
        assert not wan.approximate
        pair = start_pair(wan, tmp_path, procs, "--once")
        agent, source, port, ctl, pki = pair.agent, pair.source, pair.port, pair.ctl, pair.pki
        assert status(ctl)["state"] == "running"

        # the forecast first: the guest measured, then the link; not a migration, so the
        # --once agent still takes the one that follows
        r = xmig("migrate", "--guest", ctl, "--to", f"{wan.dst_addr}:{port}", "--pki", str(pki),
                 "--plan", "--plan-time", "1s", "--json", timeout=60)
        assert r.returncode == 0, r.stderr
        plan = json.loads(r.stdout.splitlines()[-1])
        assert plan["converges"] is True and plan["total_s"] > 0
        assert 0 < plan["downtime_ms"] <= 300
        probe = plan["link_probe"]
        assert 0.25 * 25e6 < probe["rate_Bps"] < 1.1 * 25e6  # 200 Mbit/s, on a busy host too
        assert 0.015 < probe["rtt_s"] < 0.05 and probe["received_bytes"] == probe["sent_bytes"]
        assert plan["guest"]["ram_bytes"] > 0 and plan["one_time_bytes"] > 0
        agent.expect(lambda e: e.get("event") == "probed", 10)
        assert status(ctl)["state"] == "running"

        r = xmig("migrate", "--guest", ctl, "--to", f"{wan.dst_addr}:{port}", "--pki", str(pki),
                 "--json", "--link-rate", "200mbit", "--plot", str(tmp_path / "t.png"),
                 "--report", str(tmp_path / "report.json"), timeout=120)
        assert r.returncode == 0, r.stderr
        lines = [json.loads(line) for line in r.stdout.splitlines()]
        report = lines[-1]
        assert set(REPORT_KEYS) <= set(report)
        assert report["status"] == "done"
        assert report["verified"] is True
        assert report["lost_acknowledged_writes"] == 0
        assert report["acknowledged_writes"] > 0
        assert report["client_downtime_ms"] is None  # no client probed the guest
        assert 0 < report["downtime_ms"] < 5000
        assert 0 < report["link_utilization"] <= 1.05
        assert report["wire_bytes"] > 0 and report["rounds"] >= 1
        progress = [e for e in lines[:-1] if e.get("event") == "progress"]
        assert progress and all("session" in e and "disk" in e for e in progress)
        phases = [e["phase"] for e in lines[:-1] if e.get("event") == "phase"]
        assert phases[-1] == "done"
        assert "timeline" in json.loads((tmp_path / "report.json").read_text())
        assert (tmp_path / "t.png").stat().st_size > 0

        # the destination agent hosts the guest, which keeps running there
        arrived = agent.expect(is_ready("destination"), 30)
        assert arrived["name"] == "vm1"
        st = status(arrived["ctl"])
        assert st["state"] == "running" and st["guest_state"] == "running"
        # the source host discarded its copy and exited
        assert source.wait(30) == 0
        assert not Path(ctl).exists()
        assert not (tmp_path / "src" / "vm1" / "disk.raw").exists()  # its image went too
        # stopping the guest ends the --once agent
        r = xmig("guest", "stop", "--guest", arrived["ctl"])
        assert r.returncode == 0, r.stderr
        assert agent.wait(30) == 0


def test_a_migration_that_cannot_converge_aborts_and_the_source_runs_on(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """On loopback, capped to 40 Mbit/s: a guest dirtying 20 MB/s of pages, SDPS off,
    does not converge within 2 s; the source keeps its guest, the --once agent exits 1."""
    pki = tmp_path / "pki"
    assert xmig("certs", "init", str(pki), "--server-name", "127.0.0.1").returncode == 0
    agent = spawn(["agent", "--listen", "127.0.0.1:0", "--pki", str(pki), "--workdir",
                   str(tmp_path / "dst"), "--once", "--json"], tmp_path, "agent")
    procs.append(agent)
    source = spawn(["guest", "start", "--name", "hot", "--workdir", str(tmp_path / "src"),
                    "--ram", "32MiB", "--disk", "8MiB", "--workload", "uniform",
                    "--rate", "20MB/s", "--seed", "3", "--json"], tmp_path, "source")
    procs.append(source)
    port = agent.expect(is_ready("agent"), 30)["port"]
    ctl = source.expect(is_ready("source"), 60)["ctl"]
    # the forecast says so first, in words, and what would make it converge
    r = xmig("migrate", "--guest", ctl, "--to", f"127.0.0.1:{port}", "--pki", str(pki),
             "--no-sdps", "--timeout", "2s", "--bandwidth", "40mbit", "--plan",
             "--plan-time", "1s", timeout=60)
    assert r.returncode == 3, r.stderr
    assert "will not converge" in r.stdout and "would converge" in r.stdout, r.stdout
    assert "Mbit/s" in r.stdout and "MB/s" in r.stdout
    r = xmig("migrate", "--guest", ctl, "--to", f"127.0.0.1:{port}", "--pki", str(pki),
             "--no-sdps", "--timeout", "2s", "--bandwidth", "40mbit", "--json", timeout=120)
    assert r.returncode == 3, r.stderr
    err = r.stderr.strip()
    assert "\n" not in err and "MigrationAborted" in err and "NotConverging" in err
    final = json.loads(r.stdout.splitlines()[-1])
    assert final["status"] == "aborted" and final["source_running"] is True
    st = status(ctl)
    assert st["state"] == "running" and st["guest_state"] == "running"
    assert st["throttle"] == 0.0
    assert agent.wait(30) == 1  # its one migration was discarded
    assert xmig("guest", "stop", "--guest", ctl).returncode == 0
    assert source.wait(30) == 0


def test_a_guest_whose_migration_aborted_migrates_when_retried(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """What operators do first after an outage: retry. The aborted migration's rounds had
    cleared the guest's dirty log; the retry must still send every page (it verifies)."""
    pki = tmp_path / "pki"
    assert xmig("certs", "init", str(pki), "--server-name", "127.0.0.1").returncode == 0
    agent = spawn(["agent", "--listen", "127.0.0.1:0", "--pki", str(pki), "--workdir",
                   str(tmp_path / "dst"), "--json"], tmp_path, "agent")
    procs.append(agent)
    source = spawn(["guest", "start", "--name", "vm2", "--workdir", str(tmp_path / "src"),
                    "--ram", "64MiB", "--disk", "8MiB", "--workload", "oltp", "--rate",
                    "5MB/s", "--disk-rate", "1MB/s", "--seed", "5", "--json"], tmp_path, "source")
    procs.append(source)
    port = agent.expect(is_ready("agent"), 30)["port"]
    ctl = source.expect(is_ready("source"), 60)["ctl"]
    to = ["--to", f"127.0.0.1:{port}", "--pki", str(pki), "--json"]
    r = xmig("migrate", "--guest", ctl, *to, "--timeout", "2s", "--bandwidth", "20mbit",
             timeout=120)
    assert r.returncode == 3, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["status"] == "aborted"
    r = xmig("migrate", "--guest", ctl, *to, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.splitlines()[-1])
    assert report["status"] == "done" and report["verified"] is True
    assert report["lost_acknowledged_writes"] == 0
    arrived = agent.expect(is_ready("destination"), 30)
    assert status(arrived["ctl"])["guest_state"] == "running"
    assert xmig("guest", "stop", "--guest", arrived["ctl"]).returncode == 0


def test_a_second_host_for_the_same_guest_name_is_refused(
    tmp_path: Path, procs: list[Proc]
) -> None:
    source = spawn(["guest", "start", "--name", "one", "--workdir", str(tmp_path),
                    "--ram", "8MiB", "--disk", "8MiB", "--workload", "idle", "--json"],
                   tmp_path, "source")
    procs.append(source)
    ctl = source.expect(is_ready("source"), 60)["ctl"]
    r = xmig("guest", "start", "--name", "one", "--workdir", str(tmp_path), "--workload", "idle")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("xmig: GuestStateError:")
    # a request that is not one changes nothing
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(ctl)
        s.sendall(b'{"op": "migrate", "to": "x:1", "pki": "relative"}\n')
        reply = json.loads(s.makefile().readline())
    assert reply["ok"] is False and reply["error"]["type"] == "ConfigError"
    assert status(ctl)["state"] == "running"
    assert xmig("guest", "stop", "--guest", ctl).returncode == 0
    assert source.wait(30) == 0
    assert not Path(ctl).exists()
