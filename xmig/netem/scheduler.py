"""The packet scheduler of the WAN emulator: sans-IO, no clock, no sockets.

Packets go in with :meth:`Scheduler.offer` (a direction, an opaque packet, its wire length in
bytes and ``now``); :meth:`Scheduler.pop_due` hands back, in order, the packets whose delivery
time has come. Per direction the link is a virtual transmitter::

    tx_free = max(now, tx_free) + wire_len * 8 / rate     # the packet leaves the queue
    due     = tx_free + delay                              # and arrives at the far end

Bytes still waiting for the transmitter, ``(tx_free - now) * rate / 8``, form the queue; a
packet that would push it past the bound is tail-dropped (an empty queue always takes one).
A packet that passes the queue is lost at random with probability ``loss`` (seeded RNG, one
stream per direction); a lost packet still occupies the transmitter, as on a real wire.
While the link is cut everything offered is dropped, and packets in flight are discarded.
Unshaped links (``rate_bps`` None) have no transmitter and no queue: ``due = now + delay``.
Delivery never reorders a direction: a due time is at least the previous one.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import random
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from xmig.netem.spec import LinkSpec

P = TypeVar("P")


class Direction(enum.IntEnum):
    """FWD carries src → dst, REV carries dst → src."""

    FWD = 0
    REV = 1


class Verdict(enum.Enum):
    """What :meth:`Scheduler.offer` did with a packet."""

    QUEUED = "queued"
    LOSS = "loss"
    QUEUE_FULL = "queue"
    CUT = "cut"


@dataclass
class DirectionStats:
    """Counters of one direction. Bytes are wire bytes (IP bytes on a 1500-byte MTU link)."""

    offered_packets: int = 0
    offered_bytes: int = 0
    forwarded_packets: int = 0
    forwarded_bytes: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {"loss": 0, "queue": 0, "cut": 0})
    dropped_bytes: dict[str, int] = field(default_factory=lambda: {"loss": 0, "queue": 0, "cut": 0})

    def drop(self, reason: str, wire_len: int, count: int = 1) -> None:
        self.dropped[reason] += count
        self.dropped_bytes[reason] += wire_len

    def as_dict(self) -> dict[str, Any]:
        return {
            "offered_packets": self.offered_packets,
            "offered_bytes": self.offered_bytes,
            "forwarded_packets": self.forwarded_packets,
            "forwarded_bytes": self.forwarded_bytes,
            "dropped_packets": dict(self.dropped),
            "dropped_bytes": dict(self.dropped_bytes),
        }


class _Lane:
    """The transmitter, RNG and counters of one direction."""

    def __init__(self, direction: Direction, seed: int) -> None:
        self.direction = direction
        self.tx_free = 0.0
        self.last_due = 0.0
        self.in_flight = 0
        self.stats = DirectionStats()
        self.rng = random.Random(f"xmig-netem-{seed}-{direction.name}")


class Scheduler(Generic[P]):
    """Rate, delay, queue bound, random loss and cuts for the two directions of one link."""

    def __init__(self, spec: LinkSpec) -> None:
        self._spec = spec
        self._lanes = (_Lane(Direction.FWD, spec.seed), _Lane(Direction.REV, spec.seed))
        self._heap: list[tuple[float, int, Direction, int, P]] = []
        self._seq = itertools.count()
        self._cut = False

    @property
    def spec(self) -> LinkSpec:
        """The parameters in force."""
        return self._spec

    @property
    def is_cut(self) -> bool:
        """True between :meth:`cut` and :meth:`restore`."""
        return self._cut

    def set(self, spec: LinkSpec) -> None:
        """Change the parameters for packets offered from now on (in-flight ones keep theirs).

        A new seed restarts both loss RNGs.
        """
        if spec.seed != self._spec.seed:
            for lane in self._lanes:
                lane.rng = random.Random(f"xmig-netem-{spec.seed}-{lane.direction.name}")
        self._spec = spec

    def _delay(self, direction: Direction) -> float:
        return self._spec.delay_fwd_s if direction is Direction.FWD else self._spec.delay_rev_s

    def backlog_bytes(self, direction: Direction, now: float) -> float:
        """Bytes waiting for the transmitter of ``direction`` at ``now``."""
        rate = self._spec.rate_bps
        if rate is None:
            return 0.0
        return max(0.0, self._lanes[direction].tx_free - now) * rate / 8

    def offer(self, direction: Direction, packet: P, wire_len: int, now: float) -> Verdict:
        """Take a packet that entered the link at ``now``; say whether it will be delivered."""
        lane = self._lanes[direction]
        lane.stats.offered_packets += 1
        lane.stats.offered_bytes += wire_len
        if self._cut:
            lane.stats.drop("cut", wire_len)
            return Verdict.CUT
        spec = self._spec
        if spec.rate_bps is None:
            departure = now
        else:
            backlog = self.backlog_bytes(direction, now)
            limit = spec.effective_queue_bytes()
            if backlog > 0 and limit is not None and backlog + wire_len > limit:
                lane.stats.drop("queue", wire_len)
                return Verdict.QUEUE_FULL
            lane.tx_free = max(now, lane.tx_free) + wire_len * 8 / spec.rate_bps
            departure = lane.tx_free
        if spec.loss > 0 and lane.rng.random() < spec.loss:
            lane.stats.drop("loss", wire_len)
            return Verdict.LOSS
        due = max(departure + self._delay(direction), lane.last_due)
        lane.last_due = due
        lane.in_flight += 1
        heapq.heappush(self._heap, (due, next(self._seq), direction, wire_len, packet))
        return Verdict.QUEUED

    def next_due(self) -> float | None:
        """When the earliest packet in flight is due, or None if none is."""
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[tuple[Direction, P]]:
        """Remove and return, in delivery order, the packets due at or before ``now``."""
        out: list[tuple[Direction, P]] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, direction, wire_len, packet = heapq.heappop(heap)
            lane = self._lanes[direction]
            lane.in_flight -= 1
            lane.stats.forwarded_packets += 1
            lane.stats.forwarded_bytes += wire_len
            out.append((direction, packet))
        return out

    def cut(self, now: float) -> int:
        """Pull the cable: drop what is in flight or queued and all that comes until restore.

        Returns how many in-flight packets were discarded.
        """
        self._cut = True
        discarded = len(self._heap)
        for _, _, direction, wire_len, _ in self._heap:
            self._lanes[direction].stats.drop("cut", wire_len)
        self._heap.clear()
        for lane in self._lanes:
            lane.in_flight = 0
            lane.tx_free = min(lane.tx_free, now)
            lane.last_due = min(lane.last_due, now)
        return discarded

    def restore(self) -> None:
        """Plug the cable back in: packets offered from now on flow again."""
        self._cut = False

    def stats(self) -> dict[str, Any]:
        """Counters per direction (``fwd``, ``rev``), whether cut, and the spec in force."""
        return {
            "fwd": {**self._lanes[0].stats.as_dict(), "in_flight": self._lanes[0].in_flight},
            "rev": {**self._lanes[1].stats.as_dict(), "in_flight": self._lanes[1].in_flight},
            "cut": self._cut,
            "spec": self._spec.to_dict(),
        }
