"""The cgroup v1 CPU quota actuator of SDPS for QEMU, on a plain process's thread."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from xmig.guest.qemu.throttle import CGROUP_CPU, CgroupThrottle

pytestmark = pytest.mark.root


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, clock ticks


def test_quota_throttles_the_thread_and_release_undoes_it() -> None:
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        group = CgroupThrottle("xmig-test-throttle")
        group.attach([spin.pid])
        group.set(0.8)
        assert (group.path / "cpu.cfs_quota_us").read_text().strip() == "20000"
        before, t0 = cpu_seconds(spin.pid), time.monotonic()
        time.sleep(1.0)  # measuring a rate over a second, not waiting for a condition
        share = (cpu_seconds(spin.pid) - before) / (time.monotonic() - t0)
        assert 0.1 < share < 0.35  # 20 % of a CPU
        group.release()
        assert not group.path.exists()
        assert str(spin.pid) in (CGROUP_CPU / "tasks").read_text().split()
        group.release()  # idempotent
    finally:
        spin.kill()
        spin.wait()
