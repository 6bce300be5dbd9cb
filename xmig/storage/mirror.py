"""The asynchronous I/O mirror of XvMotion: a bounded queue of guest writes. Sans-IO.

Every guest write reaches the local disk first, then :meth:`MirrorQueue.submit`. The part of
it below the bulk-copy **cursor** (the copier has already claimed that region) is mirrored;
the part at or above the cursor is not (the copier will read it later). Clipping at the
cursor, with the cursor advanced *before* the copier reads a region, makes the split exact:
for every byte, the writes submitted before the copier claimed it are in the bulk copy, the
writes submitted after are in the mirror (see :mod:`xmig.storage.apply` for the other half).

Congestion control: ``queued_bytes`` (admitted writes not yet applied by the destination)
never exceeds the **bound**, except that one write larger than the bound is admitted into an
empty queue. A write that fits is admitted and acknowledged at once; one that does not is
**held** (FIFO, acknowledgement delayed) until applied writes make room. So a guest writing
faster than the link is slowed to the link's rate, and the backlog the guest believes written
but the destination does not yet have is at most the bound. :meth:`set_bound` changes it at
run time (shrinking it as switchover nears; bound 0 is a synchronous mirror).

Pacing: :meth:`set_pace` makes acknowledgements leave at a rate (bytes/s) the convergence
controller sets, with the bound kept as the hard cap. A write is admitted when the queue fits
it *and* the pacer has credit for it (a virtual clock that advances by ``length / rate`` per
admitted write; idle time earns at most ``burst_s`` of credit), so a guest that writes faster
than the pace is slowed write by write, evenly, instead of running free until the bound is
full and then stopping. One write moves the pacer's clock at most ``max_hold_s`` (0.25 s)
ahead: a large write (QEMU's mirror job copies up to 1 MiB at a time) cannot hold the
guest's small writes behind it for ``length / rate``, while a stream of small writes keeps
the pace exactly. Timers are data: :meth:`get_timer` says when the first held write's
credit is due, :meth:`handle_timer` releases what is due by then.

Order: writes are sent in submit order, with wire sequence numbers given at :meth:`take`.
Coalescing, within writes not yet taken (correctness first):
- a write that starts inside or right at the end of the newest queued write, is merged into
  it (its bytes overwrite the tail's): sequential appends and re-writes of the last block;
- otherwise a write with exactly the range of an older queued write replaces it: the old one
  is dropped and the new one appended at the end, so everything in between still comes
  before it (a hot block rewritten while queued costs its size once).
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from xmig.errors import StorageError

Data = bytes | bytearray | memoryview
#: acknowledgement-delay buckets' upper edges, seconds: 0 (at once), then 0.1 ms × 1.25^k
DELAY_BUCKETS_S = (0.0, *(1e-4 * 1.25 ** k for k in range(64)))
MERGE_LIMIT = 1 << 20  #: largest write coalescing builds
MAX_HOLD_S = 0.25  #: one write moves the pacer's clock at most this far ahead


@dataclass(slots=True)
class Ticket:
    """One submitted guest write; acknowledge the guest once ``acked``."""

    id: int
    offset: int
    length: int  #: bytes mirrored (0: nothing below the cursor, acknowledged at once)
    submitted_at: float
    acked_at: float | None = None

    @property
    def acked(self) -> bool:
        return self.acked_at is not None


@dataclass(slots=True)
class MirrorWrite:
    """A write to send to the destination, in ``seq`` order, fenced by ``epoch``."""

    seq: int
    epoch: int
    offset: int
    data: Data

    @property
    def length(self) -> int:
        return len(self.data)


@dataclass
class MirrorStats:
    writes_submitted: int = 0
    writes_mirrored: int = 0  #: writes with a part below the cursor
    bytes_mirrored: int = 0
    writes_merged: int = 0  #: merged into the newest queued write
    writes_superseded: int = 0  #: older queued writes replaced by a write of the same range
    bytes_saved: int = 0  #: bytes coalescing kept off the wire
    writes_taken: int = 0
    bytes_taken: int = 0
    writes_delayed: int = 0  #: acknowledged later than submitted (held)
    delay_total_s: float = 0.0
    delay_max_s: float = 0.0
    max_queued_bytes: int = 0  #: highest queued_bytes observed (admitted, unapplied)
    max_held_bytes: int = 0
    #: every mirrored write's acknowledgement delay, counted in buckets (DELAY_BUCKETS_S)
    delay_counts: list[int] = field(default_factory=lambda: [0] * (len(DELAY_BUCKETS_S) + 1))

    def delay_quantile(self, q: float) -> float:
        """The ``q`` quantile (0 … 1) of the mirrored writes' acknowledgement delays, in
        seconds: the upper edge of its bucket (0.0: acknowledged at once; 0.0 for none)."""
        total = sum(self.delay_counts)
        if not total:
            return 0.0
        rank, seen = q * total, 0
        for k, count in enumerate(self.delay_counts):
            seen += count
            if seen >= rank and count:
                return 0.0 if k == 0 else DELAY_BUCKETS_S[min(k, len(DELAY_BUCKETS_S) - 1)]
        return DELAY_BUCKETS_S[-1]

    def count_delay(self, delay_s: float) -> None:
        self.delay_counts[bisect.bisect_left(DELAY_BUCKETS_S, delay_s)] += 1

    def restart_delays(self) -> tuple[float, float]:
        """Count acknowledgement delays afresh from now; returns the largest and the 99th
        percentile so far (seconds): a phase whose writes are not the guest's own, QEMU's
        mirror job copying the disk before it is ready, is reported apart."""
        before = (self.delay_max_s, self.delay_quantile(0.99))
        self.delay_max_s = self.delay_total_s = 0.0
        self.writes_delayed = 0
        self.delay_counts = [0] * len(self.delay_counts)
        return before


@dataclass(slots=True)
class _Entry:
    offset: int
    data: Data
    owned: bool = False  #: data is a bytearray of ours (merges may change it in place)

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


@dataclass(slots=True)
class _Held:
    ticket: Ticket
    data: Data = field(repr=False)


class MirrorQueue:
    """Bounded, ordered queue of mirrored writes; all times are ``now`` passed in."""

    def __init__(self, bound: int, epoch: int, *, cursor: int = 0,
                 merge_limit: int = MERGE_LIMIT) -> None:
        if bound < 0:
            raise ValueError("the mirror bound cannot be negative")
        self.bound = bound
        self.epoch = epoch
        self.cursor = cursor  #: bytes below this are mirrored
        self.merge_limit = merge_limit
        self.stats = MirrorStats()
        self.stopped = False
        self.queued_bytes = 0  #: admitted, not yet applied by the destination (≤ bound)
        self.held_bytes = 0  #: submitted, not admitted: their acknowledgement waits
        self.inflight_bytes = 0  #: taken (sent), not yet applied
        self.applied_seq = 0  #: the destination applied every write up to this seq
        self._next_ticket = 1
        self._next_seq = 1
        self._next_entry = 0
        self._untaken: dict[int, _Entry] = {}  # insertion order is submit order
        self._by_range: dict[tuple[int, int], int] = {}
        self._tail: int | None = None
        self._inflight: deque[MirrorWrite] = deque()
        self._held: deque[_Held] = deque()
        self.pace_Bps: float | None = None  #: acknowledgement rate; None: the bound alone
        self.burst_s = 0.0  #: credit an idle pacer may save, in seconds of ``pace_Bps``
        self.max_hold_s = MAX_HOLD_S  #: one write moves the pacer's clock at most this far
        self._pace_at = 0.0  #: the pacer's clock: no admission before it

    # -- the source's write path ----------------------------------------------------------

    def set_cursor(self, position: int) -> None:
        """The bulk copier claimed everything below ``position`` (call before reading it)."""
        if position < self.cursor:
            raise ValueError(f"the cursor moves forward only ({position} < {self.cursor})")
        self.cursor = position

    def submit(self, offset: int, data: Data, now: float) -> Ticket:
        """A guest write that reached the local disk. The ticket is acknowledged now, or
        later by :meth:`on_applied` / :meth:`set_bound`."""
        st = self.stats
        st.writes_submitted += 1
        ticket = Ticket(self._next_ticket, offset, 0, now)
        self._next_ticket += 1
        cut = min(offset + len(data), self.cursor)
        if self.stopped or cut <= offset:
            ticket.acked_at = now
            return ticket
        if cut < offset + len(data):
            data = memoryview(data)[: cut - offset]
        ticket.length = cut - offset
        st.writes_mirrored += 1
        st.bytes_mirrored += ticket.length
        if not self._held and self._fits(ticket.length) and self._paced(now):
            self._admit(offset, data)
            self._charge(ticket.length, now)
            ticket.acked_at = now
            st.count_delay(0.0)
        else:
            self._held.append(_Held(ticket, data))
            self.held_bytes += ticket.length
            st.max_held_bytes = max(st.max_held_bytes, self.held_bytes)
        return ticket

    def set_bound(self, bound: int, now: float) -> list[Ticket]:
        """Change the bound; returns the tickets a larger bound releases."""
        if bound < 0:
            raise ValueError("the mirror bound cannot be negative")
        self.bound = bound
        return self._release(now)

    def set_pace(self, rate_Bps: float | None, now: float, *, burst_s: float = 0.05
                 ) -> list[Ticket]:
        """Acknowledge mirrored writes at ``rate_Bps`` at most (None: as fast as the bound
        lets them); returns the tickets a faster pace releases now."""
        if rate_Bps is not None and rate_Bps <= 0:
            raise ValueError("the mirror's pace must be positive (None: unpaced)")
        if burst_s < 0:
            raise ValueError("the pacer's burst cannot be negative")
        self.pace_Bps, self.burst_s = rate_Bps, burst_s
        return self._release(now)

    def get_timer(self) -> float | None:
        """When the first held write is due by the pace (None: none waits on the pace; one
        that waits on the bound is released by :meth:`on_applied`)."""
        if self.pace_Bps is None or not self._held:
            return None
        if not self._fits(self._held[0].ticket.length):
            return None
        return self._pace_at

    def handle_timer(self, now: float) -> list[Ticket]:
        """Release the held writes due by ``now``."""
        return self._release(now)

    # -- the sender's side ----------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        """Writes are waiting to be taken."""
        return bool(self._untaken)

    def take(self, max_bytes: int) -> list[MirrorWrite]:
        """The next writes to send, in order, about ``max_bytes`` at most (at least one)."""
        out: list[MirrorWrite] = []
        total = 0
        while self._untaken:
            key = next(iter(self._untaken))
            entry = self._untaken[key]
            if out and total + len(entry.data) > max_bytes:
                break
            del self._untaken[key]
            self._unmap(key, entry)
            if key == self._tail:
                self._tail = None
            write = MirrorWrite(self._next_seq, self.epoch, entry.offset, entry.data)
            self._next_seq += 1
            total += write.length
            out.append(write)
            self._inflight.append(write)
            self.inflight_bytes += write.length
        self.stats.writes_taken += len(out)
        self.stats.bytes_taken += total
        return out

    def on_applied(self, seq: int, now: float) -> list[Ticket]:
        """The destination applied (and fsynced) every write up to ``seq``; returns the
        held tickets now acknowledged, in submit order."""
        if seq >= self._next_seq:
            raise StorageError(f"destination applied mirror seq {seq}, only "
                               f"{self._next_seq - 1} were sent")
        while self._inflight and self._inflight[0].seq <= seq:
            write = self._inflight.popleft()
            self.inflight_bytes -= write.length
            self.queued_bytes -= write.length
        self.applied_seq = max(self.applied_seq, seq)
        return self._release(now)

    def stop(self, now: float) -> list[Ticket]:
        """Stop mirroring (abort, or the destination failed): drop the queue, acknowledge
        every held write (each is on the local disk), acknowledge later writes at once."""
        self.stopped = True
        released = [h.ticket for h in self._held]
        for t in released:
            self._ack_late(t, now)
        self._held.clear()
        self._untaken.clear()
        self._by_range.clear()
        self._inflight.clear()
        self._tail = None
        self.held_bytes = self.queued_bytes = self.inflight_bytes = 0
        return released

    @property
    def pending_bytes(self) -> int:
        """Bytes still to reach the destination (queued and held): what a drain must move."""
        return self.queued_bytes + self.held_bytes

    @property
    def idle(self) -> bool:
        """Every mirrored write is applied at the destination."""
        return not self._held and self.queued_bytes == 0

    @property
    def last_seq(self) -> int:
        """The seq of the last write taken (0: none)."""
        return self._next_seq - 1

    # -- internals ------------------------------------------------------------------------

    def _fits(self, length: int) -> bool:
        return self.queued_bytes + length <= self.bound or self.queued_bytes == 0

    def _release(self, now: float) -> list[Ticket]:
        released = []
        while (self._held and self._fits(self._held[0].ticket.length)
               and self._paced(now)):
            held = self._held.popleft()
            self.held_bytes -= held.ticket.length
            self._admit(held.ticket.offset, held.data)
            self._charge(held.ticket.length, now)
            self._ack_late(held.ticket, now)
            released.append(held.ticket)
        return released

    def _paced(self, now: float) -> bool:
        return self.pace_Bps is None or self._pace_at <= now

    def _charge(self, length: int, now: float) -> None:
        if self.pace_Bps is not None:
            start = max(self._pace_at, now - self.burst_s)
            self._pace_at = start + min(length / self.pace_Bps, self.max_hold_s)

    def _ack_late(self, ticket: Ticket, now: float) -> None:
        ticket.acked_at = now
        delay = now - ticket.submitted_at
        st = self.stats
        st.writes_delayed += 1
        st.delay_total_s += delay
        st.delay_max_s = max(st.delay_max_s, delay)
        st.count_delay(delay)

    def _map(self, key: int, entry: _Entry) -> None:
        """Index ``entry`` by its range; an older entry of that same range is wholly
        overwritten by it, and dropped."""
        rng = (entry.offset, len(entry.data))
        old = self._by_range.get(rng)
        if old is not None and old != key:
            del self._untaken[old]
            self.queued_bytes -= rng[1]
            self.stats.writes_superseded += 1
            self.stats.bytes_saved += rng[1]
        self._by_range[rng] = key

    def _unmap(self, key: int, entry: _Entry) -> None:
        rng = (entry.offset, len(entry.data))
        if self._by_range.get(rng) == key:
            del self._by_range[rng]

    def _admit(self, offset: int, data: Data) -> None:
        n = len(data)
        end = offset + n
        st = self.stats
        tail = self._untaken.get(self._tail) if self._tail is not None else None
        if (tail is not None and tail.offset <= offset <= tail.end
                and max(end, tail.end) - tail.offset <= self.merge_limit):
            old_len = len(tail.data)
            assert self._tail is not None
            self._unmap(self._tail, tail)  # before buf, which may be tail.data, changes
            buf = tail.data if tail.owned else bytearray(tail.data)
            assert isinstance(buf, bytearray)
            if offset == tail.end:
                buf += data
            else:
                rel = offset - tail.offset
                buf[rel:rel + n] = data  # may grow past the tail's end
            tail.data, tail.owned = buf, True
            self.queued_bytes += len(buf) - old_len
            st.writes_merged += 1
            st.bytes_saved += n - (len(buf) - old_len)
            self._map(self._tail, tail)
        else:
            key = self._next_entry
            self._next_entry += 1
            entry = _Entry(offset, data)
            self._untaken[key] = entry
            self._tail = key
            self.queued_bytes += n
            self._map(key, entry)
        st.max_queued_bytes = max(st.max_queued_bytes, self.queued_bytes)
