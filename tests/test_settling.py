"""A source keeps telling its journaled decision (``xmig.orchestrator.settling``): here, an ABORT
that
could not cross. Real processes, TLS, the emulated WAN: the link goes down just as the
destination says READY, so the source never hears it, aborts at its blackout deadline and
runs on, while the destination holds a paused copy, in doubt, until ABORT reaches it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.opsproc import Proc, spawn, start_pair, status
from xmig.guest.sim.dest import IMAGE_NAME
from xmig.netem import LinkSpec, Wan, tun_available
from xmig.orchestrator import recovery
from xmig.protocol.switchover import DestPhase

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(not tun_available(), reason="needs root and /dev/net/tun")]

#: READY takes 200 ms to reach the source: the cut lands first
LINK = LinkSpec.symmetric(rate_bps=200_000_000, rtt_s=0.4)


def test_an_abort_the_destination_did_not_hear_is_told_once_the_link_is_back(
        tmp_path: Path, procs: list[Proc]) -> None:
    with Wan(LINK) as wan:
        pair = start_pair(wan, tmp_path, procs)
        migrate = spawn(["migrate", "--guest", pair.ctl, "--to", f"{wan.dst_addr}:{pair.port}",
                         "--pki", str(pair.pki), "--max-downtime", "1s",
                         "--blackout-timeout", "2s", "--json"], tmp_path, "migrate")
        procs.append(migrate)
        pair.agent.expect(lambda e: e.get("event") == "phase" and e.get("phase") == "ready",
                          120)
        wan.cut()
        assert migrate.wait(60) == 3, migrate.stderr.read_text()
        assert "blackout passed its deadline of 2 s" in migrate.stderr.read_text()
        st = status(pair.ctl)
        assert st["state"] == "running" and st["guest_state"] == "running", st
        assert st["abort_pending"]["migration"] == "vm1", st
        # the destination holds its paused copy; the source tries while the link is down
        retry = pair.source.expect(lambda e: e.get("event") == "abort-retry", 60)
        assert retry["name"] == "vm1"
        [held] = recovery.scan(tmp_path / "dst")
        assert held.phase is DestPhase.IN_DOUBT  # READY journaled, nothing after

        wan.restore()
        # the agent ends the migration's old session (its side had not noticed the cut) and
        # applies the ABORT at once, not a resume deadline (60 s) later
        pair.agent.expect(lambda e: e.get("event") == "superseded", 60)
        done = pair.source.expect(lambda e: e.get("event") == "abort-delivered", 60)
        assert done["note"] == "the destination discarded its copy", done
        assert status(pair.ctl)["abort_pending"] is None
        [held] = recovery.scan(tmp_path / "dst")
        assert held.phase is DestPhase.DISCARDED
        assert not (held.dir / IMAGE_NAME).exists()  # the image deleted

