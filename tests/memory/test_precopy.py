"""The planner's prediction and decisions, with exact numbers."""

from __future__ import annotations

import math

import pytest

from xmig.memory.precopy import (
    BusyRate,
    Decision,
    Figures,
    PlannerConfig,
    PrecopyPlanner,
    predict_downtime,
)

MB = 1_000_000


def test_prediction_formula() -> None:
    f = Figures(remaining_bytes=10 * MB, wire_ratio=0.5, backlog_bytes=2 * MB,
                device_state_bytes=1 * MB, mirror_queue_bytes=2 * MB,
                delivery_rate=100 * MB, rtt=0.1)
    # (10 × 0.5 + 2 + 1 + 2) MB ÷ 100 MB/s + 1.5 × 0.1 s
    assert predict_downtime(f) == pytest.approx(0.1 + 0.15)
    assert predict_downtime(f, commit_rtts=3) == pytest.approx(0.1 + 0.3)
    assert predict_downtime(Figures(0, delivery_rate=0.0, rtt=0.02)) == pytest.approx(0.03)
    assert predict_downtime(Figures(4096, delivery_rate=0.0)) == math.inf


def planner(**kw: object) -> PrecopyPlanner:
    return PrecopyPlanner(PlannerConfig(**kw), start=100.0)  # type: ignore[arg-type]


def test_switchover_when_it_fits_the_budget() -> None:
    p = planner()
    p.on_round(1000 * MB)
    v = p.decide(now=101, figures=Figures(50 * MB, delivery_rate=100 * MB, rtt=0.06))
    assert v.decision is Decision.CONTINUE and v.predicted_downtime == pytest.approx(0.59)
    assert v.round == 0
    p.on_round(22 * MB)
    v = p.decide(now=110, figures=Figures(22 * MB, delivery_rate=100 * MB, rtt=0.06))
    assert v.decision is Decision.CONTINUE and v.predicted_downtime == pytest.approx(0.31)
    v = p.decide(now=110, figures=Figures(20 * MB, delivery_rate=100 * MB, rtt=0.06))
    assert v.decision is Decision.SWITCHOVER and v.round == 1
    assert v.predicted_downtime == pytest.approx(0.29)


def test_rounds_that_stop_shrinking_engage_sdps_once() -> None:
    p = planner(stall_rounds=2, shrink=0.9)
    big = Figures(500 * MB, delivery_rate=100 * MB)
    for size, want in [(1000, False), (400, False), (300, False), (280, False), (290, True)]:
        p.on_round(size * MB)
        assert p.stalled() is want, (size, p.rounds)
    # 300 was the best before the last two (280 ≥ 0.9 × 300, 290 ≥ 270)
    assert p.decide(now=101, figures=big).decision is Decision.ENGAGE_SDPS
    assert p.sdps_engaged
    p.on_round(295 * MB)
    assert p.decide(now=102, figures=big).decision is Decision.CONTINUE


def test_a_guest_dirtying_faster_than_the_link_engages_after_round_0() -> None:
    p = planner()
    p.on_round(1000 * MB)
    fast = Figures(900 * MB, delivery_rate=100 * MB, wire_ratio=0.5, dirty_rate=200 * MB)
    assert p.decide(now=101, figures=fast).decision is Decision.CONTINUE  # round 0
    p.on_round(900 * MB)
    slow = Figures(900 * MB, delivery_rate=100 * MB, wire_ratio=0.5, dirty_rate=199 * MB)
    assert p.decide(now=102, figures=slow).decision is Decision.CONTINUE
    v = p.decide(now=102, figures=fast)
    assert v.decision is Decision.ENGAGE_SDPS and "dirty rate" in v.reason


def test_no_sdps_means_no_engagement() -> None:
    p = planner(sdps=False)
    for size in (100, 100, 100, 100):
        p.on_round(size * MB)
    v = p.decide(now=101, figures=Figures(100 * MB, delivery_rate=MB, dirty_rate=10 * MB))
    assert p.stalled() and v.decision is Decision.CONTINUE


def test_timeout_means_not_converging_but_a_fit_still_wins() -> None:
    p = planner(timeout=60)
    p.on_round(100 * MB)
    late = Figures(100 * MB, delivery_rate=10 * MB)
    assert p.decide(now=159.9, figures=late).decision is Decision.CONTINUE
    v = p.decide(now=160, figures=late)
    assert v.decision is Decision.NOT_CONVERGING and "timeout 60 s" in v.reason
    fits = Figures(1 * MB, delivery_rate=10 * MB)
    assert p.decide(now=200, figures=fits).decision is Decision.SWITCHOVER


def test_config_is_checked() -> None:
    with pytest.raises(ValueError):
        PlannerConfig(downtime_budget=0)
    with pytest.raises(ValueError):
        PlannerConfig(shrink=1.5)


def test_busy_rate_counts_only_time_with_a_backlog() -> None:
    r = BusyRate(window=2.0, min_busy=0.0)
    assert r.update(now=0, delivered=0, busy=True) is None
    assert r.update(now=1, delivered=50, busy=True) == 50
    assert r.update(now=2, delivered=150, busy=False) == 50  # drained during it: not counted
    assert r.update(now=9, delivered=160, busy=True) == 50  # idle time: not counted
    assert r.update(now=10, delivered=240, busy=True) == pytest.approx(130 / 2)
    assert r.update(now=10.5, delivered=300, busy=True) == pytest.approx(190 / 2.5)
    # one more busy second: the oldest span leaves the 2-second window
    assert r.update(now=11.5, delivered=400, busy=True) == pytest.approx(240 / 2.5)
    warming = BusyRate(min_busy=0.5)
    warming.update(now=0, delivered=0, busy=True)
    assert warming.update(now=0.4, delivered=40, busy=True) is None
    assert warming.update(now=0.5, delivered=45, busy=True) == pytest.approx(90)


def test_a_budget_under_the_commit_floor_does_not_converge_at_once() -> None:
    # 1.5 × 250 ms = 375 ms of round trips alone: a 300 ms budget can never be met
    p = planner(downtime_budget=0.3)
    p.on_round(10 * MB)
    v = p.decide(now=100.5, figures=Figures(0, delivery_rate=100 * MB, rtt=0.25))
    assert v.decision is Decision.NOT_CONVERGING
    assert "commit floor" in v.reason and "375 ms" in v.reason


def test_the_floor_uses_the_least_rtt_not_the_queue_inflated_one() -> None:
    # a full queue makes the smoothed RTT 400 ms; the path itself is 100 ms (floor 150 ms)
    p = planner(downtime_budget=0.3)
    p.on_round(10 * MB)
    f = Figures(50 * MB, delivery_rate=10 * MB, rtt=0.4, base_rtt=0.1)
    assert p.decide(now=100.5, figures=f).decision is Decision.CONTINUE
    f = Figures(0, delivery_rate=10 * MB, rtt=0.1, base_rtt=0.1)
    assert p.decide(now=101, figures=f).decision is Decision.SWITCHOVER
