"""The mirror queue's paced acknowledgements (issue 10), on a fake clock: writes leave at the
pace, evenly, each at its due time and never later; the bound stays the hard cap."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xmig.storage.mirror import MAX_HOLD_S, MirrorQueue, Ticket

K = 4096
BIG = 1 << 40  #: a bound that never binds


def run_timers(queue: MirrorQueue, until: float) -> list[Ticket]:
    """What an event loop does: fire each due timer, in order, up to ``until``."""
    released: list[Ticket] = []
    while (due := queue.get_timer()) is not None and due <= until:
        released += queue.handle_timer(due)
    return released


def test_a_writer_faster_than_the_pace_is_acknowledged_write_by_write_at_the_pace() -> None:
    queue = MirrorQueue(BIG, 1, cursor=BIG)
    queue.set_pace(100 * K, 0.0, burst_s=0.0)  # 100 writes/s
    tickets = [queue.submit(i * K, b"x" * K, 0.0) for i in range(50)]  # all at once
    run_timers(queue, 10.0)
    assert all(t.acked for t in tickets)
    # write k is acknowledged k × 10 ms after the first: evenly spaced, none late
    assert [round(t.acked_at or 0, 6) for t in tickets] == [
        round(k * 0.01, 6) for k in range(50)]


def test_idle_time_earns_at_most_the_burst() -> None:
    queue = MirrorQueue(BIG, 1, cursor=BIG)
    queue.set_pace(100 * K, 0.0, burst_s=0.05)
    first = queue.submit(0, b"x" * K, 0.0)
    assert first.acked_at == 0.0
    # 10 s idle: at most 50 ms of credit (5 writes) on top of the one due now
    tickets = [queue.submit(i * K, b"x" * K, 10.0) for i in range(1, 21)]
    at_once = [t for t in tickets if t.acked_at == 10.0]
    assert len(at_once) == 6
    run_timers(queue, 20.0)
    assert tickets[-1].acked_at == pytest.approx(10.0 + (20 - 6) * 0.01)


def test_the_bound_stays_the_hard_cap_and_waits_on_the_destination_not_the_timer() -> None:
    queue = MirrorQueue(4 * K, 1, cursor=BIG)
    queue.set_pace(1000 * K, 0.0, burst_s=0.0)
    tickets = [queue.submit(i * K, b"x" * K, 0.0) for i in range(8)]
    run_timers(queue, 1.0)
    assert sum(t.acked for t in tickets) == 4 and queue.queued_bytes == 4 * K
    assert queue.get_timer() is None  # the head waits on the bound: no timer
    writes = queue.take(1 << 20)
    released = queue.on_applied(writes[-1].seq, 2.0)
    assert released and released[0] is tickets[4]
    run_timers(queue, 3.0)
    assert all(t.acked for t in tickets)


def test_unpacing_releases_every_held_write_at_once() -> None:
    queue = MirrorQueue(BIG, 1, cursor=BIG)
    queue.set_pace(K, 0.0, burst_s=0.0)  # one write a second
    tickets = [queue.submit(i * K, b"x" * K, 0.0) for i in range(10)]
    assert sum(t.acked for t in tickets) == 1
    released = queue.set_pace(None, 0.5)  # e.g. the guest paused: seal
    assert len(released) == 9 and all(t.acked_at == 0.5 for t in released)
    assert queue.get_timer() is None


def test_the_delay_quantiles_count_every_mirrored_write() -> None:
    queue = MirrorQueue(BIG, 1, cursor=BIG)
    assert queue.stats.delay_quantile(0.99) == 0.0  # none yet
    queue.set_pace(100 * K, 0.0, burst_s=0.0)
    tickets = [queue.submit(i * K, b"x" * K, 0.0) for i in range(100)]
    run_timers(queue, 10.0)
    delays = sorted((t.acked_at or 0.0) - t.submitted_at for t in tickets)
    p99, p50 = queue.stats.delay_quantile(0.99), queue.stats.delay_quantile(0.5)
    # the upper edge of the bucket holding the true quantile: within 25 % above it
    assert delays[98] <= p99 <= delays[98] * 1.25 + 1e-9
    assert delays[49] <= p50 <= delays[49] * 1.25 + 1e-9
    assert queue.stats.delay_quantile(0.0) == 0.0  # the first was acknowledged at once


def test_a_bad_pace_is_refused() -> None:
    queue = MirrorQueue(BIG, 1, cursor=BIG)
    with pytest.raises(ValueError):
        queue.set_pace(0, 0.0)
    with pytest.raises(ValueError):
        queue.set_pace(K, 0.0, burst_s=-1)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(writes=st.lists(st.tuples(st.floats(0, 0.2), st.integers(1, 16)), min_size=1,
                       max_size=80),
       pace_k=st.integers(1, 400), burst_ms=st.integers(0, 100))
def test_no_write_is_held_past_its_due_time_and_the_pace_is_never_exceeded(
        writes: list[tuple[float, int]], pace_k: int, burst_ms: int) -> None:
    rate, burst = pace_k * K, burst_ms / 1000
    queue = MirrorQueue(BIG, 1, cursor=BIG)
    queue.max_hold_s = math.inf  # the pure pace (the cap per write: the test below)
    queue.set_pace(rate, 0.0, burst_s=burst)
    now, offset = 0.0, 0
    tickets: list[Ticket] = []
    for gap, pages in writes:
        now += gap
        run_timers(queue, now)  # timers due before this write fired first
        tickets.append(queue.submit(offset, b"w" * (pages * K), now))
        offset += pages * K
    run_timers(queue, now + 1e6)
    assert all(t.acked for t in tickets)
    # due time: no earlier than its submission, no later than the pace allows for the
    # bytes held before it and itself (FIFO)
    due = 0.0
    for t in tickets:
        due = max(due, t.submitted_at - burst) + t.length / rate
        assert t.acked_at is not None
        assert t.submitted_at <= t.acked_at <= max(t.submitted_at, due - t.length / rate) + 1e-9
    # the pace: bytes acknowledged in any window ≤ rate × window + the burst + one write
    acked = sorted((t.acked_at or 0.0, t.length) for t in tickets)
    for i, (start, _) in enumerate(acked):
        total = 0
        for at, length in acked[i:]:
            total += length
            assert total <= rate * (at - start) + rate * burst + length + 1e-6


def test_one_large_write_holds_the_small_ones_behind_it_a_quarter_second_at_most() -> None:
    # QEMU's mirror job copies up to 1 MiB at a time: at 64 KiB/s that would be 16 s of pace
    queue = MirrorQueue(BIG, 1, cursor=BIG)
    queue.set_pace(64 * K, 0.0, burst_s=0.0)
    big = queue.submit(0, b"j" * (1024 * K), 0.0)
    small = [queue.submit((1024 + i) * K, b"g" * (4 * K), 0.0) for i in range(3)]
    run_timers(queue, 100.0)
    assert big.acked_at == 0.0
    assert small[0].acked_at == pytest.approx(MAX_HOLD_S)
    # the small ones behind it keep the pace: 4 KiB at 64 KiB/s is 62.5 ms each
    assert small[1].acked_at == pytest.approx(MAX_HOLD_S + 4 / 64)
    assert small[2].acked_at == pytest.approx(MAX_HOLD_S + 8 / 64)


def test_delays_restart_from_a_phase_and_the_figures_before_it_are_kept() -> None:
    queue = MirrorQueue(4 * K, 1, cursor=BIG)
    first = queue.submit(0, b"a" * (4 * K), 0.0)
    held = queue.submit(4 * K, b"b" * (4 * K), 0.0)  # over the bound: held
    queue.take(BIG)
    queue.on_applied(1, 0.5)  # room: released 0.5 s late
    assert first.acked_at == 0.0 and held.acked_at == 0.5
    assert queue.stats.restart_delays()[0] == 0.5
    assert queue.stats.delay_max_s == 0.0 and queue.stats.delay_quantile(0.99) == 0.0
    queue.submit(8 * K, b"c" * K, 1.0)  # not held: it does not wait
    assert queue.stats.delay_max_s == 0.0
