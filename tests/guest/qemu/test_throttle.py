"""The cgroup v1 CPU quota actuator of SDPS for QEMU, on a plain process's thread."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from xmig.guest.qemu.throttle import (
    CGROUP_CPU,
    MAX_THROTTLE,
    PERIOD_US,
    CgroupThrottle,
    QemuSdps,
    quota_for,
    speeds_differ,
)

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


def test_a_throttle_past_99_percent_lengthens_the_period_down_to_a_tenth_of_a_percent(
        ) -> None:
    assert quota_for(0.5) == (PERIOD_US, 50_000)
    assert quota_for(0.99) == (PERIOD_US, 1_000)
    assert quota_for(0.995) == (200_000, 1_000)
    assert quota_for(MAX_THROTTLE) == (1_000_000, 1_000)
    assert quota_for(1.0) == (1_000_000, 1_000)  # capped at the kernel's limits
    assert MAX_THROTTLE == 0.999


def test_the_strongest_throttle_holds_a_spinning_thread_under_one_percent() -> None:
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        group = CgroupThrottle("xmig-test-throttle-max")
        group.attach([spin.pid])
        group.set(MAX_THROTTLE)
        assert (group.path / "cpu.cfs_period_us").read_text().strip() == "1000000"
        assert (group.path / "cpu.cfs_quota_us").read_text().strip() == "1000"
        before, t0 = cpu_seconds(spin.pid), time.monotonic()
        time.sleep(2.0)  # measuring a rate over two periods, not waiting for a condition
        share = (cpu_seconds(spin.pid) - before) / (time.monotonic() - t0)
        assert share < 0.02  # 0.1 % of a CPU; clock ticks are 10 ms (100 % unthrottled)
        group.set(0.5)  # back to the short period
        assert (group.path / "cpu.cfs_period_us").read_text().strip() == str(PERIOD_US)
        group.release()
        assert not group.path.exists()
    finally:
        spin.kill()
        spin.wait()


def test_speeds_differ_by_pace_not_by_throttle() -> None:
    assert speeds_differ(0.997, 0.999) and speeds_differ(0.0, 0.1)
    assert not speeds_differ(0.100, 0.104) and not speeds_differ(0.5, 0.5)


async def test_a_sampled_dirty_rate_under_qemus_own_is_raised_to_it(sleeper: int) -> None:
    guest: Any = FakeGuest(sleeper)

    async def sampled_low(command: str, arguments: dict[str, Any] | None = None) -> Any:
        if command == "query-dirty-rate":  # page sampling found nothing dirty
            return {"status": "measured", "dirty-rate": 0}
        if command == "query-migrate":
            return {"status": "active", "ram": {"dirty-pages-rate": 5120, "page-size": 4096}}
        return {}

    guest.execute = sampled_low
    sdps = QemuSdps(guest, cast(Any, FakeSession()))
    await sdps.start()
    try:
        await sdps.step()  # starts a measurement
        await sdps.step()
        assert sdps.samples[-1]["dirty_Bps"] == 5120 * 4096  # 20 MiB/s, QEMU's pass
        assert sdps.max_throttle > 0.5
    finally:
        sdps.release()


class FakeGuest:
    """QMP of a guest dirtying 40 MiB/s, whose vCPU is ``pid``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.config = SimpleNamespace(name="fake")
        self.calls: list[str] = []
        self.polls = 0

    async def vcpu_threads(self) -> list[int]:
        return [self.pid]

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.calls.append(command)
        if command == "query-dirty-rate":
            self.polls += 1
            status = "measuring" if self.polls % 2 else "measured"
            return {"status": status, "dirty-rate": 40}
        if command == "query-migrate":  # its last pass saw fewer (distinct pages)
            return {"status": "active", "ram": {"dirty-pages-rate": 2560, "page-size": 4096}}
        return {}


class FakeSession:
    def stats(self) -> dict[str, Any]:
        return {"delivery_rate_Bps": 12.5e6}


@pytest.fixture
def sleeper() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


async def test_sdps_throttles_a_guest_outrunning_the_link_and_releases(sleeper: int) -> None:
    guest: Any = FakeGuest(sleeper)
    sdps = QemuSdps(guest, cast(Any, FakeSession()))
    await sdps.start()
    for _ in range(6):
        await sdps.step()
    # every other poll finds a measurement: 2 samples of 40 MiB/s against 0.7 × 12.5 MB/s
    assert len(sdps.samples) == 2 and sdps.samples[0]["dirty_Bps"] == 40 << 20
    assert sdps.max_throttle > 0.7
    quota = int((sdps.cgroup.path / "cpu.cfs_quota_us").read_text())
    assert 0 < quota < 0.3 * PERIOD_US
    assert guest.calls.count("calc-dirty-rate") == 3  # the first, then after each result
    assert guest.calls.count("query-migrate") == 2  # with each result
    sdps.release()
    assert not sdps.cgroup.path.exists()
