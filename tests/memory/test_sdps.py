"""SDPS against QEMU's auto-converge, on the controllers alone and in simulation."""

from __future__ import annotations

import pytest

from xmig.memory.precopy import PlannerConfig
from xmig.memory.sdps import MAX_THROTTLE, AutoConverge, ProportionalThrottle
from xmig.memory.sdps.simulate import SimGuest, SimLink, simulate

MB = 1_000_000


def test_proportional_sets_exactly_the_needed_throttle() -> None:
    c = ProportionalThrottle(alpha=0.5, gain=1.0, window=0.0)
    # target 0.5 × 100 MB/s × share 0.8 = 40 MB/s; the guest dirties 80 MB/s
    assert c.update(now=0, delivery_rate=100 * MB, dirty_rate=80 * MB,
                    memory_share=0.8) == pytest.approx(0.5)
    # measured under 0.5: 40 MB/s, so still 80 unthrottled: unchanged
    assert c.update(now=1, delivery_rate=100 * MB, dirty_rate=40 * MB,
                    memory_share=0.8) == pytest.approx(0.5)
    # compressible pages: wire ratio 0.25 makes the demand 20 MB/s: no throttle at all
    assert c.update(now=2, delivery_rate=100 * MB, dirty_rate=40 * MB,
                    memory_share=0.8, wire_ratio=0.25) == 0.0
    assert c.max_seen == pytest.approx(0.5)


def test_proportional_releases_as_soon_as_the_guest_calms_down() -> None:
    c = ProportionalThrottle(alpha=0.7, gain=1.0, window=0.0)
    assert c.update(now=0, delivery_rate=10 * MB, dirty_rate=28 * MB) == pytest.approx(0.75)
    assert c.update(now=1, delivery_rate=10 * MB, dirty_rate=1 * MB) == 0.0
    assert c.update(now=2, delivery_rate=0, dirty_rate=1 * MB) == MAX_THROTTLE
    assert c.release() == 0.0 and c.throttle == 0.0 and c.base is None


def test_proportional_accounts_for_a_lagging_meter() -> None:
    """The meter averages over 1 s: half of it under throttle 0, half under 0.5."""
    c = ProportionalThrottle(alpha=0.5, gain=1.0, window=1.0)
    assert c.update(now=10.0, delivery_rate=100 * MB, dirty_rate=100 * MB) == 0.5
    # true base 100: the meter shows (0.5 × 100 + 0.5 × 50) = 75 at t = 10.5
    assert c.update(now=10.5, delivery_rate=100 * MB, dirty_rate=75 * MB) == pytest.approx(0.5)


def test_auto_converge_steps_20_then_10_and_ignores_the_link() -> None:
    c = AutoConverge()
    seen = []
    for _ in range(8):  # every round dirty > 50 % of what was sent
        seen.append(c.on_round(now=0, dirty_bytes=60, sent_bytes=100))
    assert seen == pytest.approx([0, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5])
    assert c.update(now=1, delivery_rate=1e12, dirty_rate=1) == pytest.approx(0.5)
    assert c.on_round(now=2, dirty_bytes=40, sent_bytes=100) == pytest.approx(0.5)
    assert c.release() == 0.0


CONFIG = PlannerConfig(timeout=600)


@pytest.mark.parametrize("link_rate", [12.5 * MB, 125 * MB])  # 100 Mbit/s, 1 Gbit/s
def test_twice_the_link_rate_converges_only_with_a_controller(link_rate: float) -> None:
    guest = SimGuest(base_dirty=2 * link_rate, noise=0.1)
    link = SimLink(rate=link_rate, rtt=0.1)
    none = simulate(None, guest, link, CONFIG)
    sdps = simulate(ProportionalThrottle(), guest, link, CONFIG)
    qemu = simulate(AutoConverge(), guest, link, CONFIG)
    assert not none.converged
    assert sdps.converged and sdps.downtime <= 0.3
    # the needed throttle is 1 − 0.7 × 1/2 = 0.65; SDPS stays near it, QEMU climbs past
    assert 0.6 <= sdps.max_throttle <= 0.7
    assert qemu.converged and qemu.max_throttle >= 0.8
    assert sdps.time < qemu.time
    assert sdps.penalty * sdps.time < qemu.penalty * qemu.time  # less guest work lost


def test_auto_converge_throttles_a_guest_that_converges_alone() -> None:
    """0.6 × the link rate converges unaided: SDPS never engages, QEMU still stalls it."""
    guest, link = SimGuest(base_dirty=0.6 * 12.5 * MB), SimLink(rate=12.5 * MB)
    sdps = simulate(ProportionalThrottle(), guest, link, CONFIG)
    qemu = simulate(AutoConverge(), guest, link, CONFIG)
    assert sdps.converged and sdps.max_throttle == 0.0 and sdps.engaged_at is None
    assert qemu.converged and qemu.max_throttle >= 0.2


def test_at_four_times_the_link_qemu_ends_near_its_ceiling() -> None:
    guest, link = SimGuest(base_dirty=50 * MB), SimLink(rate=12.5 * MB)
    sdps = simulate(ProportionalThrottle(), guest, link, CONFIG)
    qemu = simulate(AutoConverge(), guest, link, CONFIG)
    assert sdps.converged and sdps.max_throttle == pytest.approx(1 - 0.7 / 4, abs=0.01)
    assert qemu.max_throttle >= 0.9 and qemu.time > 1.5 * sdps.time


def test_without_time_enough_even_sdps_reports_not_converging() -> None:
    guest, link = SimGuest(base_dirty=50 * MB), SimLink(rate=12.5 * MB)
    r = simulate(ProportionalThrottle(), guest, link, PlannerConfig(timeout=100))
    assert not r.converged and r.time >= 100
