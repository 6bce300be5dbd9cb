"""``xmig resolve``: an operator lists the migrations in doubt on a host and forces a side
when the other site is gone. Real processes, TLS, the emulated WAN; the site's loss is a
``kill -9`` of its process right after the destination said READY."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
from pathlib import Path

import pytest

from tests.opsproc import XMIG, Proc, spawn, start_pair, status, xmig
from xmig.errors import GuestNotFound
from xmig.guest.sim import read_ledger, verify_ledger
from xmig.netem import LinkSpec, Wan, tun_available
from xmig.orchestrator import recovery
from xmig.protocol import control
from xmig.protocol.journal import Journal
from xmig.protocol.switchover import DestPhase
from xmig.storage.raw import RawFileBackend

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(not tun_available(), reason="needs root and /dev/net/tun")]

#: GO takes one RTT to reach the destination after READY left it: the kill lands first
LINK = LinkSpec.symmetric(rate_bps=200_000_000, rtt_s=0.4)


def start_migrating(wan: Wan, tmp: Path, procs: list[Proc]) -> tuple[Proc, Proc, str, Proc]:
    """An agent and a source guest host (:func:`start_pair`), and a migration from one to
    the other started; returns the agent, the source, the source's control socket and the
    migrate client."""
    pair = start_pair(wan, tmp, procs)
    migrate = spawn(["migrate", "--guest", pair.ctl, "--to", f"{wan.dst_addr}:{pair.port}",
                     "--pki", str(pair.pki), "--max-downtime", "1s", "--json"], tmp, "migrate")
    procs.append(migrate)
    return pair.agent, pair.source, pair.ctl, migrate


def listed(workdir: Path) -> list[dict[str, object]]:
    r = xmig("resolve", "--workdir", str(workdir), "--json")
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def resolve_on_a_terminal(workdir: Path, answer: str, *args: str) -> tuple[int, str]:
    """``xmig resolve`` with a terminal for stdin, ``answer`` typed at its prompt."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([*XMIG, "resolve", "--workdir", str(workdir), *args],
                                stdin=follower, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        os.write(leader, answer.encode() + b"\n")
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(leader)
        os.close(follower)
    return proc.returncode, out + err


def test_a_source_in_doubt_whose_destination_site_is_gone_is_forced_to_abort_and_runs_on(
        tmp_path: Path, procs: list[Proc]) -> None:
    with Wan(LINK) as wan:
        agent, source, ctl, migrate = start_migrating(wan, tmp_path, procs)
        # READY reached the source, which journals GO next: the destination's site goes
        migrate.expect(lambda e: e.get("step") == "ready received", 120)
        agent.popen.send_signal(signal.SIGKILL)
        agent.popen.wait(10)
        assert migrate.wait(120) == 4, migrate.stderr.read_text()
        [doubt] = listed(tmp_path / "src")
        assert (doubt["migration"], doubt["role"], doubt["ctl"]) == ("vm1", "source", ctl)

        # bad input changes nothing: no such migration; no terminal to confirm on
        r = xmig("resolve", "--workdir", str(tmp_path / "src"), "--migration", "vm2",
                 "--force", "abort", "--yes")
        assert r.returncode == 2 and r.stderr.startswith("xmig: GuestNotFound:"), r.stderr
        r = xmig("resolve", "--workdir", str(tmp_path / "src"), "--migration", "vm1",
                 "--force", "abort")
        assert r.returncode == 2 and r.stderr.startswith("xmig: ConfigError:"), r.stderr
        rc, out = resolve_on_a_terminal(tmp_path / "src", "no", "--migration", "vm1",
                                        "--force", "abort")
        assert rc == 1 and "nothing changed" in out, out
        st = status(ctl)
        assert st["state"] == "in-doubt" and st["guest_state"] == "paused", st

        rc, out = resolve_on_a_terminal(tmp_path / "src", "vm1", "--migration", "vm1",
                                        "--force", "abort")
        assert rc == 0 and "forced abort" in out, out
        st = status(ctl)
        assert st["state"] == "running" and st["guest_state"] == "running", st
        assert listed(tmp_path / "src") == []
        journal = Journal(next((tmp_path / "src").rglob("journal")))
        forced = journal.records()[-1]
        assert (forced.kind, forced.fields["decision"]) == ("FORCED", "abort")
        assert [r.kind for r in journal.records()][-2:] == ["GO", "FORCED"]

        # nothing acknowledged is lost: every write in the guest's ledger is on its disk
        assert xmig("guest", "stop", "--guest", ctl).returncode == 0
        assert source.wait(30) == 0
        with RawFileBackend(next((tmp_path / "src").rglob("disk.raw"))) as disk:
            check = verify_ledger(read_ledger(next((tmp_path / "src").rglob("*.ledger"))),
                                  disk.pread)
        assert check.acknowledged > 0 and not check.lost


def test_a_destination_in_doubt_whose_source_site_is_gone_is_forced_to_go_and_runs(
        tmp_path: Path, procs: list[Proc]) -> None:
    with Wan(LINK) as wan:
        agent, source, _, _ = start_migrating(wan, tmp_path, procs)
        agent.expect(lambda e: e.get("event") == "phase" and e.get("phase") == "ready", 120)
        source.popen.send_signal(signal.SIGKILL)  # the source's site is gone, its guest too
        source.popen.wait(10)
        # the destination gives its session up (idle, then the resume deadline): in doubt
        agent.expect(lambda e: e.get("event") == "in-doubt", 120)
        [doubt] = listed(tmp_path / "dst")
        assert (doubt["migration"], doubt["role"]) == ("vm1", "destination")
        assert doubt["ctl"] == str(tmp_path / "dst" / "agent.ctl")

        r = xmig("resolve", "--workdir", str(tmp_path / "dst"), "--migration", "vm1",
                 "--force", "go", "--yes", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["forced"] == "go"
        hosting = agent.expect(lambda e: e.get("event") == "ready" and bool(e.get("name")), 30)
        st = status(hosting["ctl"])
        assert st["state"] == "running" and st["guest_state"] == "running", st
        assert listed(tmp_path / "dst") == []

        # journaled: FORCED before RUNNING; the source's contrary word is refused for ever
        [held] = recovery.scan(tmp_path / "dst")
        kinds = [r.kind for r in Journal(held.dir / "journal").records()]
        assert kinds[-3:] == ["READY", "FORCED", "RUNNING"], kinds
        assert held.phase is DestPhase.RUNNING
        abort = control.Abort("vm1", held.epoch, "the source came back", held.token)
        reply = recovery.answer([held], abort, held.owner)
        assert isinstance(reply, control.Refused) and reply.error == "GuestStateError", reply
        with pytest.raises(GuestNotFound):  # and nobody else is told anything
            recovery.answer([held], abort, "another-identity")
        assert xmig("guest", "stop", "--guest", hosting["ctl"]).returncode == 0
