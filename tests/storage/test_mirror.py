"""The mirror queue: acknowledgement at the bound, order, coalescing, bound changes, epoch."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xmig.errors import StorageError
from xmig.storage.mirror import MirrorQueue, MirrorWrite, Ticket

K = 4096


def q(bound: int, *, cursor: int = 1 << 30, epoch: int = 1) -> MirrorQueue:
    return MirrorQueue(bound, epoch, cursor=cursor)


def apply(disk: bytearray, writes: list[MirrorWrite]) -> None:
    for w in writes:
        disk[w.offset:w.offset + w.length] = bytes(w.data)


def test_acked_at_once_up_to_the_bound_then_held() -> None:
    m = q(3 * K)
    tickets = [m.submit(i * 10 * K, bytes([i]) * K, now=float(i)) for i in range(5)]
    assert [t.acked for t in tickets] == [True, True, True, False, False]  # 3K fits exactly
    assert m.queued_bytes == 3 * K and m.held_bytes == 2 * K
    assert m.pending_bytes == 5 * K
    sent = m.take(1 << 20)
    assert [w.seq for w in sent] == [1, 2, 3] and m.inflight_bytes == 3 * K
    assert m.on_applied(1, now=10.0) == [tickets[3]]  # one write out, one in
    assert tickets[3].acked_at == 10.0 and not tickets[4].acked
    assert m.queued_bytes == 3 * K
    assert m.on_applied(3, now=12.0) == [tickets[4]]
    assert m.stats.writes_delayed == 2
    assert m.stats.delay_total_s == pytest.approx((10.0 - 3.0) + (12.0 - 4.0))
    assert m.stats.delay_max_s == pytest.approx(8.0)
    assert m.stats.max_queued_bytes == 3 * K
    rest = m.take(1 << 20)
    assert [w.seq for w in rest] == [4, 5]
    assert [bytes(w.data)[:1] for w in sent + rest] == [bytes([i]) for i in range(5)]
    m.on_applied(5, now=13.0)
    assert m.idle and m.queued_bytes == 0 and m.last_seq == 5


def test_no_write_overtakes_a_held_one() -> None:
    m = q(2 * K)
    a = m.submit(0, b"a" * 2 * K, 0.0)
    b = m.submit(100 * K, b"b" * 2 * K, 0.0)  # held
    c = m.submit(200 * K, b"c" * 1, 0.0)  # would fit... no: queue is full (2K)
    assert a.acked and not b.acked and not c.acked
    m.take(1 << 20)
    assert m.on_applied(1, 1.0) == [b]  # b fills the queue again; c still waits
    m.take(1 << 20)
    assert m.on_applied(2, 2.0) == [c]


def test_write_larger_than_the_bound_goes_alone() -> None:
    m = q(K)
    big = m.submit(0, bytes(8 * K), 0.0)
    assert big.acked and m.queued_bytes == 8 * K  # an empty queue takes it
    small = m.submit(64 * K, b"s" * 10, 0.0)
    assert not small.acked
    m.take(1 << 20)
    assert m.on_applied(1, 1.0) == [small]


def test_bound_zero_is_a_synchronous_mirror() -> None:
    m = q(0)
    first = m.submit(0, b"x" * K, 0.0)
    second = m.submit(K * 8, b"y" * K, 0.0)
    assert first.acked and not second.acked  # first into the empty queue
    m.take(1 << 20)
    assert m.on_applied(1, 1.0) == [second]


def test_set_bound_at_run_time() -> None:
    m = q(4 * K)
    held = []
    for i in range(8):
        t = m.submit(i * 16 * K, b"z" * K, 0.0)
        if not t.acked:
            held.append(t)
    assert len(held) == 4
    assert m.set_bound(6 * K, 1.0) == held[:2]  # growing releases what now fits
    assert m.queued_bytes == 6 * K
    assert m.set_bound(K, 2.0) == []  # shrinking holds new writes...
    late = m.submit(999 * K, b"l" * K, 2.0)
    assert not late.acked
    m.take(3 * K)
    assert m.on_applied(3, 3.0) == []  # ...until the queue is under the new bound
    m.take(1 << 20)
    released = m.on_applied(6, 4.0)
    assert released == [held[2]]
    assert m.queued_bytes <= K
    with pytest.raises(ValueError):
        m.set_bound(-1, 5.0)


def test_only_the_part_below_the_cursor_is_mirrored() -> None:
    m = q(1 << 20, cursor=8 * K)
    above = m.submit(8 * K, b"a" * K, 0.0)
    assert above.acked and above.length == 0 and m.queued_bytes == 0
    span = m.submit(7 * K, b"0" * K + b"1" * K, 0.0)
    assert span.acked and span.length == K
    m.set_cursor(16 * K)
    after = m.submit(8 * K, b"2" * K, 0.0)
    assert after.length == K
    writes = m.take(1 << 20)  # span's clipped part, with the adjacent write merged in
    assert [(w.offset, bytes(w.data)) for w in writes] == [(7 * K, b"0" * K + b"2" * K)]
    with pytest.raises(ValueError):
        m.set_cursor(K)


def test_every_write_carries_the_epoch_and_dense_seqs() -> None:
    m = q(1 << 20, epoch=42)
    for i in range(3):
        m.submit(i * 100 * K, b"e" * K, 0.0)
    writes = m.take(1 << 20)
    assert [(w.epoch, w.seq) for w in writes] == [(42, 1), (42, 2), (42, 3)]
    with pytest.raises(StorageError):
        m.on_applied(4, 1.0)  # never sent


def test_take_respects_max_bytes_but_takes_one() -> None:
    m = q(1 << 20)
    for i in range(4):
        m.submit(i * 100 * K, b"t" * 3 * K, 0.0)
    assert len(m.take(K)) == 1
    assert len(m.take(6 * K)) == 2
    assert len(m.take(1 << 20)) == 1 and not m.has_work


def test_coalescing_appends_overwrites_and_supersedes() -> None:
    m = q(1 << 20)
    m.submit(0, b"a" * K, 0.0)
    m.submit(K, b"b" * K, 0.0)  # adjacent: merged
    m.submit(K // 2, b"c" * K, 0.0)  # inside the tail: merged
    m.submit(64 * K, b"d" * K, 0.0)  # elsewhere: new entry
    m.submit(0, b"e" * 2 * K, 0.0)  # same range as the first entry: supersedes it
    assert m.queued_bytes == 3 * K
    assert m.stats.writes_merged == 2 and m.stats.writes_superseded == 1
    writes = m.take(1 << 20)
    assert [(w.offset, w.length) for w in writes] == [(64 * K, K), (0, 2 * K)]
    assert bytes(writes[1].data) == b"e" * 2 * K
    m.submit(0, b"f" * K, 0.0)  # the taken entries are in flight: no merging into them
    assert [(w.seq, bytes(w.data)) for w in m.take(1 << 20)] == [(3, b"f" * K)]


def test_stop_releases_everything_and_passes_later_writes() -> None:
    m = q(K)
    m.submit(0, b"x" * K, 0.0)
    held = m.submit(10 * K, b"y" * K, 0.0)
    assert m.stop(1.0) == [held] and held.acked
    assert m.idle and m.queued_bytes == 0
    later = m.submit(20 * K, b"z" * K, 2.0)
    assert later.acked and later.length == 0 and not m.has_work


# -- against a model -------------------------------------------------------------------

DISK = 64 * K
op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, DISK // 512 - 1), st.integers(1, 24),
              st.integers(0, 255)),
    st.tuples(st.just("take"), st.integers(1, 16 * K)),
    st.tuples(st.just("apply"), st.integers(0, 8)),
    st.tuples(st.just("bound"), st.integers(0, 16 * K)),
    st.tuples(st.just("cursor"), st.integers(0, DISK)),
    # near the previous write (merges into the tail) or the same range again (supersedes)
    st.tuples(st.just("near"), st.integers(0, 8), st.integers(1, 24), st.integers(0, 255)),
    st.tuples(st.just("again"), st.integers(0, 7), st.integers(0, 255)),
)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(op, max_size=80), bound=st.integers(0, 16 * K),
       cursor=st.sampled_from([0, DISK // 2, DISK]))
def test_queue_matches_model(ops: list[tuple[int | str, ...]], bound: int,
                             cursor: int) -> None:
    """Applying the mirror's writes in seq order to the destination gives exactly the
    mirrored (clipped) parts of all guest writes applied in submit order; the queue is never
    above its bound except for one lone write; acknowledgements go out in submit order."""
    m = MirrorQueue(bound, 9, cursor=cursor, merge_limit=8 * K)
    model = bytearray(DISK)  # the clipped writes, in submit order
    dest = bytearray(DISK)  # the mirror's writes, in seq order
    inflight: list[MirrorWrite] = []
    released: list[int] = []
    tickets = []
    now = 0.0

    def note(out: list[Ticket]) -> None:
        released.extend(t.id for t in out)
        if out:  # the last admission fitted under the bound, or went into an empty queue
            assert m.queued_bytes <= m.bound or len(m._untaken) + len(m._inflight) == 1

    ranges: list[tuple[int, int]] = [(0, 512)]
    for o in ops:
        now += 1.0
        if o[0] == "near":
            _, delta, n, fill = o
            last_off, last_len = ranges[-1]
            o = ("write", (last_off + min(int(delta) * 512, last_len)) // 512 % (DISK // 512),
                 n, fill)
        elif o[0] == "again":
            off, n = ranges[-1 - int(o[1]) % len(ranges)]
            o = ("write", off // 512, n // 512, o[2])
        if o[0] == "write":
            _, sector, n, fill = o
            off = int(sector) * 512
            data = bytes([int(fill)]) * min(int(n) * 512, DISK - off)
            ranges.append((off, len(data)))
            before = m.queued_bytes
            t = m.submit(off, data, now)
            tickets.append(t)
            cut = min(off + len(data), m.cursor)
            if cut > off:
                model[off:cut] = data[:cut - off]
            if t.acked:
                assert before + t.length <= m.bound or before == 0 or t.length == 0
        elif o[0] == "take":
            inflight += m.take(int(o[1]))
        elif o[0] == "apply" and inflight:
            k = min(int(o[1]), len(inflight) - 1)
            apply(dest, inflight[:k + 1])
            note(m.on_applied(inflight[k].seq, now))
            del inflight[:k + 1]
        elif o[0] == "bound":
            note(m.set_bound(int(o[1]), now))
        elif o[0] == "cursor":
            m.set_cursor(max(m.cursor, int(o[1])))
    while not m.idle:  # drain
        inflight += m.take(1 << 20)
        apply(dest, inflight)
        note(m.on_applied(inflight[-1].seq, now + 1))
        inflight.clear()
    assert dest == model
    assert all(t.acked for t in tickets)
    assert released == sorted(released)  # held writes are acknowledged in submit order
    assert len(released) == m.stats.writes_delayed


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 8 * K), min_size=1, max_size=40),
       bound=st.integers(0, 32 * K))
def test_queue_never_exceeds_the_bound(sizes: list[int], bound: int) -> None:
    """Whatever the interleaving of submits and applies, queued_bytes stays ≤ bound unless
    one single write larger than the bound is alone in the queue."""
    m = MirrorQueue(bound, 1, cursor=1 << 30, merge_limit=0)
    for i, n in enumerate(sizes):
        m.submit(i * 64 * K, b"q" * n, float(i))
        alone = (len(m._untaken) + len(m._inflight)) == 1
        assert m.queued_bytes <= bound or alone
        if i % 3 == 2:
            m.take(1 << 20)
            if m.last_seq:
                m.on_applied(m.last_seq, float(i))
                alone = (len(m._untaken) + len(m._inflight)) == 1
                assert m.queued_bytes <= bound or alone


def test_merging_never_changes_the_callers_buffer() -> None:
    m = q(1 << 20)
    mine = bytearray(b"a" * K)
    m.submit(0, mine, 0.0)
    m.submit(K, b"b" * K, 0.0)
    m.submit(0, b"c" * 10, 0.0)
    assert mine == b"a" * K
    (w,) = m.take(1 << 20)
    assert bytes(w.data) == b"c" * 10 + b"a" * (K - 10) + b"b" * K
