"""The sans-IO packet scheduler: exact due times, rate, queue bound, seeded loss, cut."""

from __future__ import annotations

import pytest

from xmig.netem import LinkSpec
from xmig.netem.scheduler import Direction, Scheduler, Verdict

FWD, REV = Direction.FWD, Direction.REV
MB_PER_S = 8_000_000  # 1 MB/s: a 1000-byte packet takes exactly 1 ms on the wire
EPS = 1e-9  # float rounding of sums of due times


def spec(**kw: object) -> LinkSpec:
    fields: dict[str, object] = {"rate_bps": MB_PER_S, "delay_fwd_s": 0.010, "delay_rev_s": 0.030}
    fields.update(kw)
    return LinkSpec(**fields)  # type: ignore[arg-type]


def test_one_packet_is_due_after_transmission_plus_delay() -> None:
    s: Scheduler[str] = Scheduler(spec())
    assert s.offer(FWD, "a", 1000, now=100.0) is Verdict.QUEUED
    assert s.next_due() == pytest.approx(100.011)
    assert s.pop_due(100.0109) == []
    assert s.pop_due(100.011 + EPS) == [(FWD, "a")]
    assert s.next_due() is None


def test_back_to_back_packets_are_spaced_by_the_rate() -> None:
    s: Scheduler[int] = Scheduler(spec())
    for i in range(5):
        s.offer(FWD, i, 1000, now=0.0)
    dues = []
    while (due := s.next_due()) is not None:
        dues.append(due)
        s.pop_due(due)
    assert dues == pytest.approx([0.011, 0.012, 0.013, 0.014, 0.015])


def test_idle_transmitter_does_not_bank_credit() -> None:
    s: Scheduler[int] = Scheduler(spec())
    s.offer(FWD, 1, 1000, now=0.0)
    s.offer(FWD, 2, 1000, now=5.0)  # the transmitter was idle: starts at now, not at 0.001
    assert [s.pop_due(t + EPS) for t in (0.011, 5.011)] == [[(FWD, 1)], [(FWD, 2)]]


def test_directions_have_their_own_transmitter_and_delay() -> None:
    s: Scheduler[str] = Scheduler(spec())
    s.offer(FWD, "f", 1000, now=0.0)
    s.offer(REV, "r", 1000, now=0.0)
    assert s.pop_due(0.011 + EPS) == [(FWD, "f")]
    assert s.pop_due(0.030) == []
    assert s.pop_due(0.031 + EPS) == [(REV, "r")]


def test_rate_over_many_packets() -> None:
    s: Scheduler[int] = Scheduler(spec(queue_bytes=10**9))
    for i in range(10_000):  # 10 MB offered at once
        s.offer(FWD, i, 1000, now=0.0)
    delivered = s.pop_due(0.010 + 5.0 + EPS)  # after 5 s of transmission: 5 MB
    assert len(delivered) == 5000
    assert [p for _, p in delivered] == list(range(5000))
    assert s.stats()["fwd"]["forwarded_bytes"] == 5_000_000


def test_unshaped_link_only_delays() -> None:
    s: Scheduler[int] = Scheduler(spec(rate_bps=None))
    for i in range(100):
        assert s.offer(FWD, i, 65000, now=1.0) is Verdict.QUEUED
    assert len(s.pop_due(1.010 + EPS)) == 100


def test_queue_bound_tail_drops() -> None:
    # queue of 3000 bytes: with packets leaving at 1 ms each, the fourth offered at once
    # would wait behind 3000 bytes (the one in transmission counts until it has left).
    s: Scheduler[int] = Scheduler(spec(queue_bytes=3000))
    verdicts = [s.offer(FWD, i, 1000, now=0.0) for i in range(6)]
    assert verdicts == [Verdict.QUEUED] * 3 + [Verdict.QUEUE_FULL] * 3
    assert s.backlog_bytes(FWD, 0.0) == pytest.approx(3000)
    assert s.backlog_bytes(FWD, 0.0015) == pytest.approx(1500)
    assert s.offer(FWD, 9, 1000, now=0.0015) is Verdict.QUEUED  # room again
    stats = s.stats()["fwd"]
    assert stats["dropped_packets"]["queue"] == 3
    assert stats["dropped_bytes"]["queue"] == 3000


def test_empty_queue_takes_a_packet_larger_than_the_bound() -> None:
    s: Scheduler[int] = Scheduler(spec(queue_bytes=100))
    assert s.offer(FWD, 1, 65000, now=0.0) is Verdict.QUEUED
    assert s.offer(FWD, 2, 10, now=0.0) is Verdict.QUEUE_FULL


def test_default_queue_is_one_bdp() -> None:
    # 1 MB/s x 40 ms RTT = 40 kB < 256 KiB minimum
    s: Scheduler[int] = Scheduler(spec())
    accepted = sum(s.offer(FWD, i, 1000, now=0.0) is Verdict.QUEUED for i in range(1000))
    assert accepted == 262


def losses(seed: int, loss: float, n: int = 20_000) -> list[int]:
    s: Scheduler[int] = Scheduler(spec(rate_bps=None, loss=loss, seed=seed))
    return [i for i in range(n) if s.offer(FWD, i, 100, now=0.0) is Verdict.LOSS]


def test_loss_is_seeded_and_has_the_right_fraction() -> None:
    first = losses(seed=42, loss=0.01)
    assert first == losses(seed=42, loss=0.01)
    assert first != losses(seed=43, loss=0.01)
    assert 150 <= len(first) <= 250  # 1 % of 20000, well within 7 sigma
    assert losses(seed=1, loss=0.0) == []
    assert len(losses(seed=1, loss=1.0, n=100)) == 100


def test_loss_streams_differ_per_direction_and_reseed_on_set() -> None:
    s: Scheduler[int] = Scheduler(spec(rate_bps=None, loss=0.5, seed=5))
    fwd = [s.offer(FWD, i, 10, now=0.0) for i in range(64)]
    rev = [s.offer(REV, i, 10, now=0.0) for i in range(64)]
    assert fwd != rev
    s.set(spec(rate_bps=None, loss=0.5, seed=6))
    s.set(spec(rate_bps=None, loss=0.5, seed=5))  # a new seed restarts the stream
    assert [s.offer(FWD, i, 10, now=0.0) for i in range(64)] == fwd


def test_lost_packet_still_occupies_the_wire() -> None:
    s: Scheduler[int] = Scheduler(spec(loss=1.0))
    assert s.offer(FWD, 1, 1000, now=0.0) is Verdict.LOSS
    assert s.backlog_bytes(FWD, 0.0) == pytest.approx(1000)
    assert s.stats()["fwd"]["dropped_packets"]["loss"] == 1


def test_cut_drops_in_flight_and_new_packets_until_restore() -> None:
    s: Scheduler[int] = Scheduler(spec())
    s.offer(FWD, 1, 1000, now=0.0)
    s.offer(REV, 2, 1000, now=0.0)
    assert s.cut(now=0.005) == 2
    assert s.is_cut
    assert s.next_due() is None
    assert s.offer(FWD, 3, 1000, now=0.006) is Verdict.CUT
    assert s.pop_due(10.0) == []
    s.restore()
    assert s.offer(FWD, 4, 1000, now=1.0) is Verdict.QUEUED
    assert s.pop_due(1.011 + EPS) == [(FWD, 4)]  # the queue was emptied by the cut
    stats = s.stats()
    assert stats["fwd"]["dropped_packets"]["cut"] == 2
    assert stats["rev"]["dropped_packets"]["cut"] == 1
    assert stats["cut"] is False


def test_set_applies_to_new_packets_and_never_reorders() -> None:
    s: Scheduler[int] = Scheduler(spec(rate_bps=None, delay_fwd_s=0.100))
    s.offer(FWD, 1, 100, now=0.0)  # due 0.100
    s.set(spec(rate_bps=None, delay_fwd_s=0.010))
    s.offer(FWD, 2, 100, now=0.001)  # would be due 0.011: held behind packet 1
    s.offer(FWD, 3, 100, now=0.200)  # due 0.210
    assert s.pop_due(0.099) == []
    assert s.pop_due(0.100 + EPS) == [(FWD, 1), (FWD, 2)]
    assert s.pop_due(0.210 + EPS) == [(FWD, 3)]
    assert s.spec.delay_fwd_s == 0.010


def test_rate_change_takes_effect_for_the_next_packet() -> None:
    s: Scheduler[int] = Scheduler(spec(delay_fwd_s=0.0))
    s.offer(FWD, 1, 1000, now=0.0)  # leaves at 0.001
    s.set(spec(delay_fwd_s=0.0, rate_bps=2 * MB_PER_S))
    s.offer(FWD, 2, 1000, now=0.0)  # 0.5 ms more
    assert s.pop_due(0.0015 + EPS) == [(FWD, 1), (FWD, 2)]


def test_stats_count_offered_and_forwarded() -> None:
    s: Scheduler[int] = Scheduler(spec())
    s.offer(FWD, 1, 1500, now=0.0)
    s.offer(FWD, 2, 1500, now=0.0)
    s.pop_due(0.0115)
    fwd = s.stats()["fwd"]
    assert (fwd["offered_packets"], fwd["offered_bytes"]) == (2, 3000)
    assert (fwd["forwarded_packets"], fwd["forwarded_bytes"], fwd["in_flight"]) == (1, 1500, 1)
