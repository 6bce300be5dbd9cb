"""bench/soak.py: a short seeded soak (three migrations back and forth between two agents
across the emulated WAN, one of them with a fault) prints its one JSON object with every
key, and counts each migration once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from xmig.netem import tun_available

ROOT = Path(__file__).resolve().parent.parent
SOAK = ROOT / "bench" / "soak.py"
KEYS = {"migrations", "completed", "aborted_clean", "failures", "both_running", "none_running",
        "lost_acknowledged_writes", "leaked", "seconds", "faults", "seed", "backend", "link",
        "versions"}


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(not tun_available(), reason="needs root and /dev/net/tun")
def test_short_soak_counts_every_migration_once() -> None:
    # seed 1 gives migration 0 a link cut past the session's resume deadline (60 s after
    # its 5 s idle timeout): about 85 s in all here
    cmd = [sys.executable, str(SOAK), "--json", "--backend", "sim", "--migrations", "3",
           "--seed", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=230, check=False,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    assert proc.stdout, proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout)
    assert set(out) >= KEYS, KEYS - set(out)
    assert out["migrations"] == 3
    assert out["completed"] + out["aborted_clean"] + out["failures"] == 3
    assert set(out["leaked"]) == {"processes", "sockets", "files", "cgroups"}
    assert out["seed"] == 1 and out["backend"] == "sim"
    assert {"python", "kernel", "xmig"} <= set(out["versions"])
    assert all({"index", "fault", "phase", "outcome"} <= set(f) for f in out["faults"])
    assert proc.returncode == (0 if out["failures"] == 0 else 1)


def test_qemu_backend_without_the_test_guest_is_refused_in_words(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SOAK), "--json", "--backend", "qemu",
                           "--migrations", "1", "--guest-build", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "needs the test guest" in proc.stderr and not proc.stdout
