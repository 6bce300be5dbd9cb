"""The forecast: the controller's model run ahead, from measured rates (no I/O)."""

from __future__ import annotations

import pytest

from xmig.convergence import ControllerConfig
from xmig.convergence.forecast import GOODPUT, GuestRates, forecast

MB = 1_000_000
MiB = 1 << 20
LINK = 12.5 * MB  #: 100 Mbit/s


def test_a_quiet_guest_is_forecast_to_move_at_the_links_rate_unslowed() -> None:
    guest = GuestRates(ram_bytes=256 * MiB, disk_bytes=256 * MiB, dirty_Bps=0.5 * MB,
                       disk_write_Bps=0.5 * MB, hot_bytes=16 * MiB)
    f = forecast(ControllerConfig(), guest, rate_Bps=LINK, rtt_s=0.05)
    assert f.converges and f.throttle == 0
    # the bulk copy shares the link with the guest's disk writes
    assert f.total_s == pytest.approx(512 * MiB / (LINK * GOODPUT - 0.5 * MB), rel=0.05)
    assert f.one_time_bytes == 512 * MiB and f.link_Bps == LINK and f.guest == guest
    assert f.downtime_ms is not None and f.downtime_ms <= 300
    assert f.penalty < 0.05


def test_a_guest_that_outruns_the_link_is_forecast_slowed_and_converging() -> None:
    guest = GuestRates(ram_bytes=256 * MiB, disk_bytes=256 * MiB, dirty_Bps=2 * LINK,
                       disk_write_Bps=5 * LINK)
    f = forecast(ControllerConfig(), guest, rate_Bps=LINK, rtt_s=0.05)
    assert f.converges
    assert f.throttle == pytest.approx(1 - 0.7 * 0.5 * GOODPUT / 7, abs=0.01)  # bulk: 35 %
    assert f.penalty > 0.8 and f.total_s is not None and f.total_s > 512 * MiB / LINK


def test_a_guest_no_throttle_can_slow_enough_is_told_what_link_would_do() -> None:
    guest = GuestRates(ram_bytes=MiB, disk_bytes=0, dirty_Bps=200 * LINK, disk_write_Bps=0)
    f = forecast(ControllerConfig(), guest, rate_Bps=LINK, rtt_s=0.05)
    assert not f.converges and f.total_s is None
    assert f.bandwidth_needed_Bps is not None and f.bandwidth_needed_Bps > LINK
    assert "Mbit/s or more would converge" in f.reason


def test_a_budget_under_the_commit_is_told_the_budget_that_could_be_kept() -> None:
    guest = GuestRates(ram_bytes=MiB, disk_bytes=0, dirty_Bps=0, disk_write_Bps=0)
    f = forecast(ControllerConfig(budget_s=0.1), guest, rate_Bps=LINK, rtt_s=0.2)
    assert not f.converges and f.budget_needed_ms is not None and f.budget_needed_ms > 300
    assert f.to_json()["converges"] is False


def test_the_first_pass_is_counted_at_its_wire_size_not_the_guests() -> None:
    # a guest whose memory compresses 4:1 and whose disk is mostly holes moves faster
    raw = GuestRates(ram_bytes=256 * MiB, disk_bytes=256 * MiB, dirty_Bps=0, disk_write_Bps=0)
    small = GuestRates(ram_bytes=256 * MiB, disk_bytes=16 * MiB, dirty_Bps=0,
                       disk_write_Bps=0, first_pass_ratio=0.25)
    a = forecast(ControllerConfig(), raw, rate_Bps=LINK, rtt_s=0.05)
    b = forecast(ControllerConfig(), small, rate_Bps=LINK, rtt_s=0.05)
    assert b.one_time_bytes == 80 * MiB
    assert a.total_s is not None and b.total_s is not None
    assert b.total_s == pytest.approx(a.total_s * 80 / 512, rel=0.05)


def test_with_sdps_off_a_guest_that_outruns_the_link_is_forecast_not_to_converge() -> None:
    guest = GuestRates(ram_bytes=64 * MiB, disk_bytes=0, dirty_Bps=2 * LINK, disk_write_Bps=0)
    off = forecast(ControllerConfig(max_throttle=0.0), guest, rate_Bps=LINK, rtt_s=0.05)
    on = forecast(ControllerConfig(), guest, rate_Bps=LINK, rtt_s=0.05)
    assert not off.converges and off.throttle == 0 and "would converge" in off.reason
    # a capped throttle (--max-penalty) is told the throttle that would do
    capped = forecast(ControllerConfig(max_throttle=0.1), guest, rate_Bps=LINK, rtt_s=0.05)
    assert not capped.converges and "or allowing a throttle of 0.6" in capped.reason
    assert on.converges and on.throttle > 0.5


def test_a_copy_longer_than_the_timeout_is_forecast_not_to_converge() -> None:
    guest = GuestRates(ram_bytes=1 << 30, disk_bytes=1 << 30, dirty_Bps=0, disk_write_Bps=0)
    f = forecast(ControllerConfig(timeout_s=60), guest, rate_Bps=LINK, rtt_s=0.05)
    assert not f.converges and f.total_s is not None and f.total_s > 60
    assert "timeout" in f.reason
