"""Each workload writes at its configured rate; the throttle slows progress proportionally."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from xmig.guest.sim import make_disk_image

from .conftest import GuestFactory, MiB, small_config
from .helpers import measure

RATE = 20e6


@pytest.mark.parametrize("workload", ["uniform", "hotset", "scan", "oltp"])
def test_workload_writes_pages_at_its_rate(workload: str, guests: GuestFactory) -> None:
    guest = guests(small_config(workload=workload, rate_Bps=RATE))
    window = measure(guest, 0.6)
    assert window.write_Bps == pytest.approx(RATE, rel=0.3)
    assert window.progress > 0


def test_idle_writes_nothing_but_progresses(guests: GuestFactory) -> None:
    guest = guests(small_config(workload="idle"))
    window = measure(guest, 0.5)
    assert window.page_writes == 0
    assert window.progress_rate == pytest.approx(10_000, rel=0.3)  # 100 µs ticks


def test_oltp_writes_its_disk_at_its_rate(tmp_path: Path, guests: GuestFactory) -> None:
    disk = make_disk_image(tmp_path / "disk.raw", 16 * MiB)
    guest = guests(small_config(workload="oltp", rate_Bps=4e6, disk_rate_Bps=4e6,
                                disk_url=f"file://{disk}"))
    window = measure(guest, 0.6)
    assert window.disk_write_bytes / window.seconds == pytest.approx(4e6, rel=0.3)
    assert guest.progress().table_entries > 0


def test_dirty_rate_counts_distinct_pages(guests: GuestFactory) -> None:
    """A hot set of 256 pages written at 40 MB/s: the 0.5 s window sees each page (~256
    distinct pages per window), far below the write rate."""
    guest = guests(small_config(workload="hotset", rate_Bps=40e6, hotset_bytes=1 * MiB))
    progress = guest.wait_until(lambda p: p.dirty_rate_Bps > 0 and p.write_rate_Bps > 0,
                                timeout=5)
    assert progress.write_rate_Bps == pytest.approx(40e6, rel=0.3)
    assert 0.5 * MiB / 0.5 < progress.dirty_rate_Bps <= 1.2 * MiB / 0.5
    assert guest.memory.dirty_rate() > 0


def test_throttle_half_halves_progress(guests: GuestFactory) -> None:
    guest = guests(small_config(workload="uniform", rate_Bps=40e6, write_size=64))
    full = measure(guest, 0.6)
    guest.memory.set_throttle(0.5)
    measure(guest, 0.05)  # let a period pass at the new throttle
    half = measure(guest, 0.6)
    assert half.progress_rate / full.progress_rate == pytest.approx(0.5, abs=0.075)
    assert guest.progress().throttle == 0.5
    guest.memory.set_throttle(2.0)
    assert guest.memory.throttle == 0.99


def test_throttle_half_halves_a_cpu_bound_vcpus_time(guests: GuestFactory) -> None:
    """As fast as it can: the vCPU works half the time. Its progress falls a little more
    than half on this kind of machine (a vCPU back from a stall runs slower for a while:
    cold caches), which SDPS's feedback absorbs."""
    guest = guests(small_config(workload="uniform", rate_Bps=math.inf, write_size=64))
    speed = {0.0: 0.0, 0.5: 0.0}
    busy = stalled = 0.0
    for _ in range(3):  # alternate, so that other load on the machine weighs on both
        for throttle in (0.0, 0.5):
            guest.memory.set_throttle(throttle)
            measure(guest, 0.03)
            before = guest.progress()
            speed[throttle] += measure(guest, 0.25).progress_rate
            after = guest.progress()
            if throttle:
                busy += after.busy_s - before.busy_s
                stalled += after.stalled_s - before.stalled_s
    assert busy / (busy + stalled) == pytest.approx(0.5, abs=0.075)
    assert 0.25 < speed[0.5] / speed[0.0] < 0.65
