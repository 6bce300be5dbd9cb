"""A destination host that dies after READY (``kill -9`` of its agent, as a power loss) and
comes back on the same workdir and address: real processes, TLS, the emulated WAN.

The source journaled GO (or was about to): it must keep its paused copy, in doubt, until the
destination answers. The restarted agent finds READY in the journal of a guest whose memory
is gone, journals ABANDONED, deletes what it received and tells the settling source so; only
then does the source resume its copy. Nothing acknowledged is lost, nothing is left behind.
"""

from __future__ import annotations

import functools
import json
import os
import signal
from pathlib import Path

import pytest

from tests.opsproc import Proc, is_ready, spawn, start_pair, status, xmig
from xmig.guest.sim import read_ledger, verify_ledger
from xmig.netem import LinkSpec, Wan, tun_available
from xmig.protocol.journal import Journal
from xmig.storage.raw import RawFileBackend

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(not tun_available(), reason="needs root and /dev/net/tun")]

#: GO takes one RTT to reach the destination after READY left it: the kill lands first
LINK = LinkSpec.symmetric(rate_bps=200_000_000, rtt_s=0.2)


def sim_guests_of(pid: int) -> list[int]:
    """Reference-guest processes a host with ``pid`` started (they die with it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"xmig.guest.sim" in argv and str(pid).encode() in argv:
            found.append(int(entry.name))
    return found


def test_a_destination_killed_after_ready_and_restarted_abandons_and_the_source_resumes(
        tmp_path: Path, procs: list[Proc]) -> None:
    with Wan(LINK) as wan:
        pair = start_pair(wan, tmp_path, procs)
        agent, source, port, ctl, pki = pair.agent, pair.source, pair.port, pair.ctl, pair.pki
        agent_argv, dst = pair.agent_argv, tmp_path / "dst"
        migrate = spawn(["migrate", "--guest", ctl, "--to", f"{wan.dst_addr}:{port}",
                         "--pki", str(pki), "--max-downtime", "1s", "--json"],
                        tmp_path, "migrate")
        procs.append(migrate)

        # READY reached the source, which journals GO next: the destination's power goes
        migrate.expect(lambda e: e.get("step") == "ready received", 120)
        killed = agent.popen.pid
        agent.popen.send_signal(signal.SIGKILL)
        agent.popen.wait(10)
        [incoming] = list(dst.glob("incoming-*"))
        assert [r.kind for r in Journal(incoming / "journal").records()][-1] == "READY"

        # the source journaled GO and has no confirmation: in doubt, its copy kept paused
        assert migrate.wait(120) == 4, migrate.stderr.read_text()
        err = migrate.stderr.read_text().strip()
        assert "\n" not in err and err.startswith("xmig: InDoubt:"), err
        st = status(ctl)
        assert st["state"] == "in-doubt" and st["guest_state"] == "paused", st
        src_journal = Journal(next((tmp_path / "src").rglob("journal")))
        assert [r.kind for r in src_journal.records()][-1] == "GO"

        # the agent comes back on its workdir and address: it abandons what it cannot restore
        again = spawn([*agent_argv[:2], f"{wan.dst_addr}:{port}", *agent_argv[3:]],
                      tmp_path, "agent2", functools.partial(wan.popen, "dst"))
        procs.append(again)
        abandoned = again.expect(lambda e: e.get("event") == "abandoned", 30)
        assert abandoned["migration"] == "vm1"
        again.expect(is_ready("agent"), 30)
        assert sorted(p.name for p in incoming.iterdir()) == ["journal"]  # image gone
        assert [r.kind for r in Journal(incoming / "journal").records()][-2:] == [
            "READY", "ABANDONED"]

        # the source, settling, hears it and resumes its own copy
        settled = source.expect(lambda e: e.get("event") == "settled", 120)
        assert settled["decision"] == "abandoned"
        st = status(ctl)
        assert st["state"] == "running" and st["guest_state"] == "running", st
        assert [r.kind for r in src_journal.records()][-2:] == ["GO", "ABANDONED"]
        # a GO for that epoch is never accepted there again
        answered = again.expect(lambda e: e.get("event") == "answered", 10)
        assert answered["error"] == "EpochAbandoned"

        # nothing acknowledged is lost: every write in the guest's ledger is on its disk
        assert xmig("guest", "stop", "--guest", ctl).returncode == 0
        assert source.wait(30) == 0
        ledger_path = next((tmp_path / "src").rglob("*.ledger"))
        with RawFileBackend(next((tmp_path / "src").rglob("disk.raw"))) as disk:
            check = verify_ledger(read_ledger(ledger_path), disk.pread)
        assert check.acknowledged > 0 and check.verified > 0 and not check.lost
        # nothing of the killed agent is left: processes, shared memory
        assert sim_guests_of(killed) == []
        shm = Path("/dev/shm") / f"xmig-{os.geteuid()}"
        left = [p.name for p in shm.glob(f"*incoming-{killed}-*")] if shm.exists() else []
        assert left == []
        again.popen.send_signal(signal.SIGTERM)
        assert again.wait(30) == 0
        assert json.loads(json.dumps(settled))  # the event is plain JSON
