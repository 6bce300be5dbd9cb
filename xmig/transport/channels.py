"""Channels: per-channel send and receive bookkeeping and the scheduler between them. Sans-IO.

Each channel is an ordered, reliable message stream with its own sequence numbers and a
bounded number of bytes in flight (sent but not yet consumed by the peer's application).

The scheduler serves channels by strict priority class, and inside a class by weight
(start-time fair queueing on bytes ÷ weight)::

    control  >  device state  >  { disk mirror 2 : memory 3 : disk bulk 1 }

Control (negotiation, the commit's messages, abort) and device state keep strict priority:
they are small, and a commit must never wait behind megabytes of data. The three data
channels share the link by weight when all are backlogged; a channel with nothing to send
leaves its share to the others, and one back from idle banks no credit for the time it had
nothing to send (it starts level with the others, so it cannot starve them either).

Why the mirror is not above memory and bulk: a guest whose writes keep the mirror backlogged
at link speed would starve the bulk copy for ever, and the migration could never end (the
blackout waits for the bulk copy). The mirror does not need priority to stay bounded: its
own congestion control (:mod:`xmig.storage.mirror`) holds the guest's write
acknowledgements once its queue is full, so whatever share it gets, its backlog is at most
its bound, and the guest's writes are slowed to that share. It needs a guaranteed share.

Why 2 : 3 : 1:
- mirror > bulk: a mirror backlog stalls the guest (its write acks are held), a bulk
  backlog only delays the end of the copy. With memory idle the mirror gets 2/3 of the
  link, so a guest writing flat out keeps two thirds of the link's rate for its disk, and
  the bulk copy still runs at 1/3: it ends within 3 × its size ÷ link rate (6 × while
  memory is backlogged too).
- mirror < memory: memory pre-copy decides whether the migration converges at all, and
  when memory's share is short SDPS slows the *whole* guest (its vCPUs), while a short
  mirror share slows only its disk writes. The memory engine measures its share rather
  than assuming one, so SDPS follows whatever the mirror takes.
- memory : bulk stays 3 : 1 (neither starves; round 0 and the copy overlap).
- With all three backlogged: mirror 1/3, memory 1/2, bulk 1/6 of the link.
- In the blackout the bulk copy is done, and memory and the mirror drain together; both
  must finish before the downtime ends, so their relative weight matters little there (the
  scheduler is work-conserving: the last byte leaves at the same time either way).

The window counts every frame, not only its payload: each DATA frame is charged its payload
plus :data:`FRAME_OVERHEAD` bytes, on the sender (bytes in flight) and on the receiver (bytes
held for the application) alike. Without it a peer could send millions of empty frames (each
a message the receiver must queue: an event, a deque slot, a bytes object, about 130-180 bytes
of Python objects) inside a window that counted zero bytes. With it a channel holds at most
``1.5 × window ÷ FRAME_OVERHEAD`` messages, so a flood of empty or tiny frames is bounded like
a flood of big ones, and a peer that overruns it fails typed (:class:`ProtocolError`).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from xmig.errors import ProtocolError, SequenceError
from xmig.transport.frames import FrameType, Payload, encode_header

MiB = 1024 * 1024

#: What one DATA frame costs in the window beyond its payload. 256 bytes: more than its
#: 28-byte header and more than the Python objects a queued message costs the receiver
#: (measured: about 132 bytes for an empty one, 180 for a few bytes of payload), so the
#: window's bytes bound the receiver's memory whatever the frame sizes. A 4 KiB message is
#: charged 6 % more than its payload, a batch of pages (hundreds of KiB) nothing noticeable.
FRAME_OVERHEAD = 256

#: How far beyond its window a receiver lets a sender go before it calls it an overrun
#: (the sender may exceed the window by one frame; this leaves room for that and more).
OVERRUN_FACTOR = 1.5


def frame_charge(payload_len: int) -> int:
    """What a DATA frame of ``payload_len`` bytes counts in its channel's window."""
    return payload_len + FRAME_OVERHEAD


class Channel(enum.IntEnum):
    """The channels of a migration session."""

    CONTROL = 0
    DEVICE_STATE = 1
    DISK_MIRROR = 2
    MEMORY = 3
    DISK_BULK = 4


@dataclass(frozen=True)
class ChannelSpec:
    """How one channel is scheduled and bounded."""

    channel: int
    priority: int  #: lower is served first; channels of one priority share by ``weight``
    weight: float = 1.0
    #: bytes in flight (sent, not consumed by the peer) at most; each frame counts its
    #: payload plus :data:`FRAME_OVERHEAD`
    window: int = 16 * MiB


DEFAULT_CHANNELS: tuple[ChannelSpec, ...] = (
    ChannelSpec(Channel.CONTROL, priority=0, window=4 * MiB),
    ChannelSpec(Channel.DEVICE_STATE, priority=1, window=16 * MiB),
    ChannelSpec(Channel.DISK_MIRROR, priority=3, weight=2.0, window=32 * MiB),
    ChannelSpec(Channel.MEMORY, priority=3, weight=3.0, window=96 * MiB),
    ChannelSpec(Channel.DISK_BULK, priority=3, weight=1.0, window=96 * MiB),
)


@dataclass(slots=True)
class Outgoing:
    """A data frame: queued, in flight, or waiting to be sent again."""

    seq: int
    header: bytes
    payload: bytes
    conn: int | None = None  #: the connection it was last sent on


class SendChannel:
    """The sending half of a channel: queue, in-flight frames (the replay buffer), acks."""

    def __init__(self, spec: ChannelSpec) -> None:
        self.spec = spec
        self.next_seq = 0
        self.acked = 0  #: the peer consumed every message below this sequence number
        self.peer_has = 0  #: the peer holds every message below this (consumed or not)
        self.peer_holds: set[int] = set()  #: and these beyond it (its reorder buffer)
        self.pending: deque[Outgoing] = deque()
        self.pending_bytes = 0
        self.unacked: deque[Outgoing] = deque()
        self.inflight_bytes = 0  #: payload bytes sent and not acknowledged
        self.inflight_charge = 0  #: what they count in the window (with frame overheads)
        self.retransmit: deque[Outgoing] = deque()
        self.sent_bytes = 0
        self.resent_bytes = 0
        self.acked_bytes = 0

    def enqueue(self, payload: bytes) -> int:
        seq = self.next_seq
        self.next_seq += 1
        header = encode_header(FrameType.DATA, self.spec.channel, seq, payload)
        self.pending.append(Outgoing(seq, header, payload))
        self.pending_bytes += len(payload)
        return seq

    def _drop_acked_retransmits(self) -> None:
        floor = max(self.acked, self.peer_has)
        while self.retransmit and self.retransmit[0].seq < floor:
            self.retransmit.popleft()

    def on_peer_state(self, received: int, holding: list[int]) -> None:
        """On resume the peer said it holds every message below ``received`` and those in
        ``holding``: they need no resending (they stay in flight until it acks them)."""
        if received > self.next_seq or any(s >= self.next_seq for s in holding):
            raise ProtocolError(
                f"peer claims messages on channel {self.spec.channel} beyond the "
                f"{self.next_seq} sent"
            )
        self.peer_has = max(self.peer_has, received)
        self.peer_holds = {s for s in holding if s >= self.peer_has}
        self._drop_acked_retransmits()
        if self.peer_holds:
            self.retransmit = deque(o for o in self.retransmit if o.seq not in self.peer_holds)

    def ready(self, *, retransmit: bool = True) -> bool:
        """A frame may be sent now: a retransmission (if ``retransmit``), or new data the
        window admits."""
        self._drop_acked_retransmits()
        if retransmit and self.retransmit:
            return True
        if not self.pending:
            return False
        size = frame_charge(len(self.pending[0].payload))
        return self.inflight_charge == 0 or self.inflight_charge + size <= self.spec.window

    def take(self, conn: int, *, retransmit: bool = True) -> Outgoing:
        """Pop the next frame to send on ``conn``; call only when :meth:`ready` (with the
        same ``retransmit``)."""
        if retransmit and self.retransmit:
            out = self.retransmit.popleft()
            self.resent_bytes += len(out.payload)
        else:
            out = self.pending.popleft()
            self.pending_bytes -= len(out.payload)
            self.unacked.append(out)
            self.inflight_bytes += len(out.payload)
            self.inflight_charge += frame_charge(len(out.payload))
        out.conn = conn
        self.sent_bytes += len(out.payload)
        return out

    def on_ack(self, seq: int) -> int:
        """The peer consumed everything below ``seq``; return the bytes newly acknowledged."""
        if seq > self.next_seq:
            raise ProtocolError(
                f"ack for seq {seq} on channel {self.spec.channel}, only {self.next_seq} sent"
            )
        freed = frames = 0
        while self.unacked and self.unacked[0].seq < seq:
            freed += len(self.unacked.popleft().payload)
            frames += 1
        self.acked = max(self.acked, seq)
        self.inflight_bytes -= freed
        self.inflight_charge -= freed + frames * FRAME_OVERHEAD
        self.acked_bytes += freed
        self._drop_acked_retransmits()
        return freed

    def connection_lost(self, conn: int) -> None:
        """Queue again every unacknowledged frame last sent on ``conn``, in order."""
        floor = max(self.acked, self.peer_has)
        lost = [
            o for o in self.unacked
            if o.conn == conn and o.seq >= floor and o.seq not in self.peer_holds
        ]
        if not lost:
            return
        merged = sorted({o.seq: o for o in (*self.retransmit, *lost)}.items())
        self.retransmit = deque(o for _, o in merged)

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing unacknowledged."""
        return not self.pending and not self.unacked


class RecvChannel:
    """The receiving half: in-order delivery, duplicate suppression, ack bookkeeping."""

    # Seq numbers this far ahead of the next expected one are garbage, not reordering.
    MAX_GAP = 1 << 20

    def __init__(self, spec: ChannelSpec) -> None:
        self.spec = spec
        self.next_deliver = 0
        self.consumed = 0  #: messages consumed by the application (the ack value)
        self.acked_sent = 0  #: last ack value sent to the peer
        self.reorder: dict[int, Payload] = {}
        self.buffered_bytes = 0  #: payload bytes received and not consumed
        self.buffered_frames = 0  #: messages received and not consumed
        self.buffered_charge = 0  #: what they count in the window (with frame overheads)
        self.duplicates = 0
        self.received_bytes = 0
        self.ack_due: float | None = None  #: when an ack must go out, if one is owed
        self._unacked_consumed = 0

    def on_data(self, seq: int, payload: Payload) -> list[tuple[int, Payload]]:
        """Accept a frame; return the messages now deliverable in order."""
        if seq < self.next_deliver or seq in self.reorder:
            self.duplicates += 1
            return []
        if seq >= self.next_deliver + self.MAX_GAP:
            raise SequenceError(
                f"seq {seq} on channel {self.spec.channel} is far beyond {self.next_deliver}",
                channel=self.spec.channel,
                seq=seq,
                expected=self.next_deliver,
            )
        charge = self.buffered_charge + frame_charge(len(payload))
        if charge > self.spec.window * OVERRUN_FACTOR:
            raise ProtocolError(
                f"peer overran the window of channel {self.spec.channel}: "
                f"{self.buffered_frames + 1} messages, {self.buffered_bytes + len(payload)} "
                f"payload bytes held, counting {charge} > {self.spec.window} bytes with "
                f"{FRAME_OVERHEAD} per frame"
            )
        self.buffered_bytes += len(payload)
        self.buffered_frames += 1
        self.buffered_charge = charge
        self.received_bytes += len(payload)
        if seq != self.next_deliver:
            self.reorder[seq] = payload
            return []
        out = [(seq, payload)]
        self.next_deliver += 1
        while self.next_deliver in self.reorder:
            out.append((self.next_deliver, self.reorder.pop(self.next_deliver)))
            self.next_deliver += 1
        return out

    def consume(self, nbytes: int, now: float, ack_delay: float) -> None:
        """The application took the next message (``nbytes`` long)."""
        if self.consumed >= self.next_deliver:
            raise ProtocolError(f"consumed more than delivered on channel {self.spec.channel}")
        self.consumed += 1
        self.buffered_bytes -= nbytes
        self.buffered_frames -= 1
        self.buffered_charge -= frame_charge(nbytes)
        self._unacked_consumed += frame_charge(nbytes)
        if self._unacked_consumed >= self.spec.window // 8:
            self.ack_due = now
        elif self.ack_due is None:
            self.ack_due = now + ack_delay

    def take_ack(self) -> int:
        """Mark the current ack value as sent and return it."""
        self.acked_sent = self.consumed
        self.ack_due = None
        self._unacked_consumed = 0
        return self.consumed


class Scheduler:
    """Picks the channel to serve next: strict priority, then weighted fair share.

    Inside a class, each channel has a virtual time (bytes sent ÷ weight); the ready
    channel with the lowest is served (ties: in channel order). The class's virtual time
    is that of the last frame chosen; a channel coming back from idle is lifted to it, so
    it does not bank credit for the time it had nothing to send.
    """

    def __init__(self, channels: dict[int, SendChannel]) -> None:
        self._classes: list[list[SendChannel]] = []
        for prio in sorted({c.spec.priority for c in channels.values()}):
            self._classes.append([c for c in channels.values() if c.spec.priority == prio])
        self._vtime: dict[int, float] = {c.spec.channel: 0.0 for c in channels.values()}
        self._class_vtime: list[float] = [0.0] * len(self._classes)

    def pick(self, *, allow_bulk: bool = True, retransmit: bool = True) -> SendChannel | None:
        """The channel whose frame goes next, or ``None``. Without ``allow_bulk`` only the
        first priority class (control) may send (the rate cap does not apply to it);
        without ``retransmit`` only new data is considered."""
        for i, group in enumerate(self._classes):
            if i > 0 and not allow_bulk:
                return None
            ready = [c for c in group if c.ready(retransmit=retransmit)]
            if not ready:
                continue
            if len(group) == 1:
                return ready[0]
            vtime, floor = self._vtime, self._class_vtime[i]
            for c in ready:  # a backlogged channel is never below the floor; an idle one is
                key = c.spec.channel
                if vtime[key] < floor:
                    vtime[key] = floor
            chosen = min(ready, key=lambda c: vtime[c.spec.channel])
            self._class_vtime[i] = vtime[chosen.spec.channel]
            return chosen
        return None

    def charge(self, chan: SendChannel, nbytes: int) -> None:
        """Account ``nbytes`` sent on ``chan`` towards its fair share."""
        self._vtime[chan.spec.channel] += nbytes / chan.spec.weight

