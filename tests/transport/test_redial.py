"""The resuming session's attempt schedule, without sockets (xmig.transport.redial)."""

from __future__ import annotations

import pytest

from xmig.transport.redial import (
    MAX_BACKOFF,
    MAX_PARALLEL,
    MIN_INTERVAL,
    Redial,
    attempt_timeout,
    redial_interval,
)


def test_interval_follows_the_round_trip_with_a_floor() -> None:
    assert redial_interval(None) == MIN_INTERVAL
    assert redial_interval(0.01) == MIN_INTERVAL
    assert redial_interval(0.2) == pytest.approx(0.3)


def test_attempt_timeout_is_three_round_trips_at_least_one_second_within_the_limit() -> None:
    assert attempt_timeout(None, 10.0) == 1.0
    assert attempt_timeout(0.5, 10.0) == pytest.approx(1.5)
    assert attempt_timeout(5.0, 10.0) == 10.0


def test_attempts_overlap_while_earlier_ones_are_still_waiting() -> None:
    """A SYN lost in an outage is not waited for: a new attempt starts every interval
    while the earlier ones keep running, up to MAX_PARALLEL of them."""
    plan = Redial(0.3, now=0.0)
    assert plan.due(0.0) == 0.0
    starts = []
    t = 0.0
    while (wait := plan.due(t)) is not None:
        t += wait
        plan.started(t)
        starts.append(round(t, 6))
    assert starts == [round(0.3 * i, 6) for i in range(MAX_PARALLEL)]
    assert plan.due(5.0) is None  # all slots busy: wait for one to end
    plan.failed(5.0, began=0.0)  # the first timed out: no backoff, a slot is free
    assert plan.due(5.0) == 0.0


def test_fast_failures_back_off_and_a_connection_resets_the_backoff() -> None:
    plan = Redial(0.3, now=0.0)
    gaps = []
    t = 0.0
    for _ in range(8):
        t += plan.due(t) or 0.0
        plan.started(t)
        plan.failed(t + 0.001, began=t)  # refused at once
        t += 0.001
        gaps.append(round(plan.due(t) or 0.0, 3))
    assert gaps == [0.299, 0.299, 0.299, 0.4, 0.8, 1.0, 1.0, 1.0]  # interval, then backoff
    assert max(gaps) == MAX_BACKOFF
    plan.started(t + 1.0)
    plan.connected()
    assert plan.pending == 0
    assert plan.backoff < 0.1
