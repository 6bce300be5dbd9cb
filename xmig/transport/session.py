"""The session: one migration's transport state, over one or more connections. Sans-IO.

Bytes and ``now`` go in (:meth:`Session.receive_data`, :meth:`Session.handle_timer`);
frames to write (:meth:`Session.frame_to_send`) and events (:meth:`Session.next_event`)
come out. Timers are data: :meth:`Session.get_timer` says when to call ``handle_timer``.
The asyncio driver in :mod:`xmig.transport.driver` does the sockets.

Every data frame stays in its channel's replay buffer until the peer's application has
consumed it. When a connection dies, what was in flight on it is sent again on another
(or on a new one after a reconnect); the receiver drops the copies it already has, so
nothing is lost and nothing is delivered twice.

Session states (transitions in :data:`TRANSITIONS`; an illegal one raises
:class:`~xmig.errors.StateError`; ERROR is sticky)::

    HANDSHAKE --ready--> OPEN --all connections lost--> DISCONNECTED --ready--> OPEN
        |                 |  \\                              |
        |               close  peer CLOSE                 deadline
        |                 v       v                          v
        +--deadline--> ERROR   CLOSING --peer CLOSE--> CLOSED     ERROR
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from xmig.errors import (
    ConnectionBroken,
    ConnectionClosed,
    PeerLimitExceeded,
    ProtocolError,
    SessionExpired,
    StateError,
    TransportError,
)
from xmig.transport.channels import (
    DEFAULT_CHANNELS,
    ChannelSpec,
    RecvChannel,
    Scheduler,
    SendChannel,
)
from xmig.transport.frames import (
    DEFAULT_MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    FrameType,
    Payload,
    encode_frame,
)
from xmig.transport.hello import PROTOCOL as PROTOCOL
from xmig.transport.hello import REFUSALS as REFUSALS
from xmig.transport.hello import Hello as Hello
from xmig.transport.hello import Welcome
from xmig.transport.hello import refusal as refusal
from xmig.transport.rate import DeliveryRate, RttEstimator, TokenBucket


@dataclass(frozen=True)
class SessionConfig:
    """Tunables of a session; both sides should use the same values."""

    channels: tuple[ChannelSpec, ...] = DEFAULT_CHANNELS
    max_payload: int = DEFAULT_MAX_PAYLOAD
    ack_delay: float = 0.005  #: longest an ack for consumed data is held back
    ping_interval: float = 0.5  #: liveness/RTT probe period per connection
    idle_timeout: float = 5.0  #: a connection silent this long is dead
    resume_deadline: float = 60.0  #: a session with no connection this long has failed
    rate_cap_bps: float | None = None  #: cap on data bits/s (control frames are exempt)


class SessionState(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    DISCONNECTED = "disconnected"
    CLOSING = "closing"
    CLOSED = "closed"
    ERROR = "error"


S = SessionState
TRANSITIONS: dict[tuple[SessionState, str], SessionState] = {
    (S.HANDSHAKE, "ready"): S.OPEN,
    (S.HANDSHAKE, "lost"): S.HANDSHAKE,
    (S.OPEN, "ready"): S.OPEN,
    (S.OPEN, "lost"): S.DISCONNECTED,
    (S.DISCONNECTED, "ready"): S.OPEN,
    (S.DISCONNECTED, "lost"): S.DISCONNECTED,
    (S.OPEN, "close"): S.CLOSING,
    (S.DISCONNECTED, "close"): S.CLOSING,
    (S.CLOSING, "ready"): S.CLOSING,
    (S.CLOSING, "lost"): S.CLOSING,
    (S.CLOSING, "peer_close"): S.CLOSED,
    (S.OPEN, "peer_close"): S.CLOSED,
    (S.DISCONNECTED, "peer_close"): S.CLOSED,
    (S.CLOSED, "lost"): S.CLOSED,
}


# -- events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MessageReceived:
    channel: int
    seq: int
    data: Payload


@dataclass(frozen=True)
class ConnectionReady:
    conn: int


@dataclass(frozen=True)
class ConnectionDead:
    """The session gave up on a connection (silent too long); the driver must abort it."""

    conn: int
    error: TransportError


@dataclass(frozen=True)
class PeerClosed:
    reason: str


@dataclass(frozen=True)
class SessionFailed:
    error: TransportError


Event = MessageReceived | ConnectionReady | ConnectionDead | PeerClosed | SessionFailed


@dataclass
class _Conn:
    id: int
    decoder: FrameDecoder
    last_rx: float
    next_ping: float
    ready: bool = False
    control: deque[bytes] = field(default_factory=deque)
    pings: dict[int, float] = field(default_factory=dict)
    #: the PING to answer: only the latest, so a peer that floods PINGs without reading
    #: the PONGs queues one PONG, not one per PING
    pong: int | None = None


class Session:
    """One side of a session. ``client=True`` on the side that connects (the source)."""

    def __init__(
        self, session_id: str, *, client: bool, config: SessionConfig, now: float
    ) -> None:
        self.session_id = session_id
        self.client = client
        self.config = config
        self.state = SessionState.HANDSHAKE
        self.error: TransportError | None = None
        self.send_channels = {s.channel: SendChannel(s) for s in config.channels}
        self.recv_channels = {s.channel: RecvChannel(s) for s in config.channels}
        self._scheduler = Scheduler(self.send_channels)
        self._conns: dict[int, _Conn] = {}
        self._events: deque[Event] = deque()
        self._ping_id = 0
        self._disconnected_since: float | None = now
        self._close_sent = False
        self._close_reason = ""
        self._established = False
        self.delivery = DeliveryRate()
        self.rtt = RttEstimator()
        self.bucket = (
            TokenBucket(config.rate_cap_bps / 8, burst=config.max_payload, now=now)
            if config.rate_cap_bps
            else None
        )
        self.reconnects = 0
        self.connections_lost = 0
        self.wire_bytes_in = 0
        self.wire_bytes_out = 0
        self._timer_ran = float("-inf")

    # -- state machine --------------------------------------------------------------

    def _transition(self, event: str) -> None:
        if self.state is SessionState.ERROR:
            raise StateError(f"session is in ERROR ({self.error})", state="error", event=event)
        try:
            self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise StateError(
                f"{event!r} is not allowed in state {self.state.value}",
                state=self.state.value,
                event=event,
            ) from None

    def fail(self, error: TransportError) -> None:
        """The driver gives the session up (e.g. the peer refused our certificate)."""
        self._fail(error)

    def _fail(self, error: TransportError) -> None:
        if self.state is not SessionState.ERROR:
            self.state = SessionState.ERROR
            self.error = error
            self._events.append(SessionFailed(error))

    def _check_usable(self) -> None:
        if self.state is SessionState.ERROR:
            assert self.error is not None
            raise self.error
        if self.state in (SessionState.CLOSING, SessionState.CLOSED):
            raise ConnectionClosed("the session is closed")

    # -- connections ----------------------------------------------------------------

    def add_connection(
        self, conn: int, now: float, *, hello: Hello | None = None,
        decoder: FrameDecoder | None = None,
    ) -> None:
        """A transport connection is up. The client queues HELLO; the server, given the
        client's ``hello`` (and the decoder that read it), answers WELCOME at once."""
        if self.state is SessionState.ERROR:
            raise StateError("session is in ERROR", state="error", event="add_connection")
        c = _Conn(conn, decoder or FrameDecoder(self.config.max_payload), now,
                  now + self.config.ping_interval)
        self._conns[conn] = c
        if self._established:
            self.reconnects += 1
        if self.client:
            hello_out = Hello(self.session_id, conn, not self._established,
                              self.config.max_payload, *self._received_state())
            c.control.append(hello_out.encode())
        else:
            if hello is None:
                raise ProtocolError("server connection added without the client's HELLO")
            if hello.max_payload != self.config.max_payload:
                raise ProtocolError(
                    f"peer max_payload {hello.max_payload} != ours {self.config.max_payload}"
                )
            self._apply_peer_state(hello.received, hello.holding)
            received, holding = self._received_state()
            c.control.append(Welcome(ok=True, session=self.session_id, received=received,
                                     holding=holding).encode())
            self._mark_ready(c, now)

    def _received_state(self) -> tuple[dict[int, int], dict[int, list[int]]]:
        """What this side holds per channel: all below N, and these out of order."""
        rcs = self.recv_channels.items()
        received = {ch: rc.next_deliver for ch, rc in rcs if rc.next_deliver}
        holding = {ch: sorted(rc.reorder)[:4096] for ch, rc in rcs if rc.reorder}
        return received, holding

    def _apply_peer_state(self, received: dict[int, int], holding: dict[int, list[int]]) -> None:
        for ch in {*received, *holding}:
            sc = self.send_channels.get(ch)
            if sc is None:
                raise ProtocolError(f"peer state names unknown channel {ch}")
            sc.on_peer_state(received.get(ch, 0), holding.get(ch, []))

    def _mark_ready(self, c: _Conn, now: float) -> None:
        c.ready = True
        self._established = True
        self._disconnected_since = None
        self._transition("ready")
        # acks sent on a connection that died may be lost: repeat what we know
        for rc in self.recv_channels.values():
            if rc.consumed:
                rc.ack_due = 0.0
        # probe at once, ahead of any data: the only sample of the path's RTT without the
        # queueing that bulk data adds (min_rtt)
        self._ping(c, now)
        self._events.append(ConnectionReady(c.id))

    def connection_lost(self, conn: int, now: float) -> None:
        """The driver saw connection ``conn`` end (error, EOF or abort)."""
        c = self._conns.pop(conn, None)
        if c is None:
            return
        self.connections_lost += 1
        for sc in self.send_channels.values():
            sc.connection_lost(conn)
        if not any(x.ready for x in self._conns.values()) and self.state is not SessionState.ERROR:
            if self._disconnected_since is None:
                self._disconnected_since = now
            self._transition("lost")

    @property
    def connections(self) -> list[int]:
        return [c.id for c in self._conns.values() if c.ready]

    # -- application side -----------------------------------------------------------

    def send(self, channel: int, data: bytes) -> int:
        """Queue a message; returns its sequence number on the channel."""
        self._check_usable()
        if len(data) > self.config.max_payload:
            limit = self.config.max_payload
            raise ValueError(f"message of {len(data)} bytes > max_payload {limit}")
        try:
            return self.send_channels[channel].enqueue(data)
        except KeyError:
            raise ValueError(f"no channel {channel}") from None

    def queued_bytes(self, channel: int) -> int:
        """Bytes queued on ``channel`` and not yet sent once."""
        return self.send_channels[channel].pending_bytes

    def consume(self, channel: int, nbytes: int, now: float) -> None:
        """The application took the next message of ``channel`` (``nbytes`` long)."""
        self.recv_channels[channel].consume(nbytes, now, self.config.ack_delay)

    def close(self, reason: str = "") -> None:
        """Begin an orderly close: CLOSE goes out once everything sent is acknowledged."""
        if self.state in (SessionState.CLOSING, SessionState.CLOSED, SessionState.ERROR):
            return
        self._close_reason = reason
        self._transition("close")

    @property
    def all_acked(self) -> bool:
        return all(sc.idle for sc in self.send_channels.values())

    # -- bytes in -------------------------------------------------------------------

    def receive_data(self, conn: int, data: bytes, now: float) -> None:
        """Bytes arrived on ``conn``. Raises a TransportError if they are bad: the driver
        must then drop that connection (the session itself goes on)."""
        c = self._conns.get(conn)
        if c is None:
            return
        c.decoder.feed(data)
        self.receive_frames(conn, len(data), now)

    def receive_frames(self, conn: int, nbytes: int, now: float) -> None:
        """``nbytes`` arrived on ``conn`` straight into its decoder's buffers (the driver's
        BufferedProtocol path); handle the frames now complete. Raises as ``receive_data``."""
        c = self._conns.get(conn)
        if c is None:
            return
        c.last_rx = now
        self.wire_bytes_in += nbytes
        while (frame := c.decoder.next_frame()) is not None:
            self._handle_frame(c, frame, now)

    def _handle_frame(self, c: _Conn, frame: Frame, now: float) -> None:
        t = frame.type
        if t is FrameType.WELCOME:
            if not self.client or c.ready:
                raise ProtocolError("unexpected WELCOME")
            self._on_welcome(c, frame, now)
            return
        if t is FrameType.HELLO:
            raise ProtocolError("unexpected HELLO on an established connection")
        if not c.ready:
            raise ProtocolError(f"{t.name} before the handshake completed")
        if t is FrameType.DATA:
            rc = self.recv_channels.get(frame.channel)
            if rc is None:
                raise ProtocolError(f"DATA on unknown channel {frame.channel}")
            for seq, payload in rc.on_data(frame.seq, frame.payload):
                self._events.append(MessageReceived(frame.channel, seq, payload))
        elif t is FrameType.ACK:
            sc = self.send_channels.get(frame.channel)
            if sc is None:
                raise ProtocolError(f"ACK on unknown channel {frame.channel}")
            freed = sc.on_ack(frame.seq)
            if freed:
                self.delivery.on_ack(freed, now)
        elif t is FrameType.PING:
            c.pong = frame.seq
        elif t is FrameType.PONG:
            sent = c.pings.pop(frame.seq, None)
            if sent is not None:
                self.rtt.on_sample(now - sent)
        elif t is FrameType.CLOSE:
            self._on_peer_close(frame.payload.decode("utf-8", "replace"))

    def _on_welcome(self, c: _Conn, frame: Frame, now: float) -> None:
        body = Welcome.decode(frame.payload)
        if not body.ok:
            kind = REFUSALS.get(body.code, ProtocolError)
            error = kind(f"peer refused the session: {body.error or '?'}")
            if kind is PeerLimitExceeded and self._established:
                raise error  # this connection only: the session goes on with its others
            self._fail(error)
            return
        self._apply_peer_state(dict(body.received),
                               {k: list(v) for k, v in body.holding.items()})
        self._mark_ready(c, now)

    def _on_peer_close(self, reason: str) -> None:
        if self.state is SessionState.CLOSED:
            return
        self._transition("peer_close")
        if not self._close_sent:
            self._queue_close()
        self._events.append(PeerClosed(reason))

    def _queue_close(self) -> None:
        for c in self._conns.values():
            if c.ready:
                c.control.append(
                    encode_frame(FrameType.CLOSE, 0, 0, self._close_reason.encode())
                )
                self._close_sent = True
                return

    # -- bytes out ------------------------------------------------------------------

    def frame_to_send(self, conn: int, now: float) -> tuple[bytes, bytes] | None:
        """The next frame to write on ``conn`` as (header, payload), or None for now."""
        c = self._conns.get(conn)
        if c is None:
            return None
        if c.control:
            frame = c.control.popleft()
            self.wire_bytes_out += len(frame)
            return frame, b""
        if c.pong is not None:
            frame = encode_frame(FrameType.PONG, 0, c.pong)
            c.pong = None
            self.wire_bytes_out += len(frame)
            return frame, b""
        if self.state is SessionState.ERROR:
            return None
        if not c.ready:
            # HELLO went out and WELCOME is a round trip away: new data may follow HELLO at
            # once (the server takes DATA right after HELLO), so the connection's slow start
            # begins a round trip earlier; frames sent before wait for the peer's state
            if not self.client or self.state is SessionState.CLOSED:
                return None
            return self._data_frame(c, now, retransmit=False)
        for rc in self.recv_channels.values():
            if rc.ack_due is not None and rc.ack_due <= now:
                frame = encode_frame(FrameType.ACK, rc.spec.channel, rc.take_ack())
                self.wire_bytes_out += len(frame)
                return frame, b""
        if self.state is SessionState.CLOSING and not self._close_sent and self.all_acked:
            self._queue_close()
            return self.frame_to_send(conn, now)
        if self.state is SessionState.CLOSED:
            return None
        # frames lost with a dead connection go again only on a connection heard from
        # lately: one silent as long is likely cut off by the same outage
        fresh = now - c.last_rx <= max(self.config.idle_timeout / 2, 2 * (self.rtt.srtt or 0))
        return self._data_frame(c, now, retransmit=fresh)

    def _data_frame(self, c: _Conn, now: float, *, retransmit: bool) -> tuple[bytes, bytes] | None:
        """The next DATA frame for ``c`` (``retransmit``: frames to send again too)."""
        capped = self.bucket is not None and not self.bucket.allows(now)
        chan = self._scheduler.pick(allow_bulk=not capped, retransmit=retransmit)
        if chan is None:
            return None
        out = chan.take(c.id, retransmit=retransmit)
        self._scheduler.charge(chan, len(out.payload))
        if self.bucket is not None and chan.spec.priority > 0:
            self.bucket.spend(len(out.header) + len(out.payload), now)
        self.wire_bytes_out += len(out.header) + len(out.payload)
        return out.header, out.payload

    def set_rate_cap(self, bps: float | None, now: float) -> None:
        """Cap data at ``bps`` bits/s from now (None: back to the configured cap, if any);
        never above the configured cap (an operator's ``--bandwidth``)."""
        if self.config.rate_cap_bps is not None:
            bps = self.config.rate_cap_bps if bps is None else min(bps, self.config.rate_cap_bps)
        if bps is None:
            self.bucket = None
        elif self.bucket is None:
            self.bucket = TokenBucket(bps / 8, burst=self.config.max_payload, now=now)
        else:
            self.bucket.allows(now)  # what accrued at the old rate stays
            self.bucket.rate = bps / 8

    # -- timers ---------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called, or None."""
        if self.state in (SessionState.ERROR, SessionState.CLOSED):
            return None
        times: list[float] = []
        for c in self._conns.values():
            times.append(c.last_rx + self.config.idle_timeout)
            if c.ready:
                times.append(c.next_ping)
        for rc in self.recv_channels.values():
            if rc.ack_due is not None:
                times.append(rc.ack_due)
        if self._disconnected_since is not None:
            times.append(self._disconnected_since + self.config.resume_deadline)
        if self.bucket is not None and (ready := self.bucket.next_ready()) is not None:
            times.append(ready)
        # what fell due at the last run is now the pump's business (an ack waiting for a
        # writable connection), not the timer's: reporting it again would spin the driver
        future = [t for t in times if t > self._timer_ran]
        return min(future) if future else None

    def handle_timer(self, now: float) -> None:
        """Run what is due: pings, dead-connection detection, the resume deadline."""
        if self.state in (SessionState.ERROR, SessionState.CLOSED):
            return
        self._timer_ran = now
        if self.bucket is not None:
            self.bucket.allows(now)  # refill, so its next deadline moves forward
        if (
            self._disconnected_since is not None
            and now >= self._disconnected_since + self.config.resume_deadline
        ):
            what = "reach" if not self._established else "hear from"
            self._fail(SessionExpired(
                f"could not {what} the peer for {self.config.resume_deadline:.1f}s "
                f"(session {self.session_id[:8]})"
            ))
            return
        for c in list(self._conns.values()):
            if now >= c.last_rx + self.config.idle_timeout:
                err = ConnectionBroken(
                    f"connection {c.id} silent for {now - c.last_rx:.1f}s "
                    f"(idle timeout {self.config.idle_timeout:.1f}s)"
                )
                self.connection_lost(c.id, now)
                self._events.append(ConnectionDead(c.id, err))
            elif c.ready and now >= c.next_ping:
                self._ping(c, now)

    def _ping(self, c: _Conn, now: float) -> None:
        self._ping_id += 1
        c.pings[self._ping_id] = now
        c.control.append(encode_frame(FrameType.PING, 0, self._ping_id))
        c.next_ping = now + self.config.ping_interval
        if len(c.pings) > 64:
            c.pings.pop(next(iter(c.pings)))

    # -- events and figures ----------------------------------------------------------

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def stats(self, now: float) -> dict[str, object]:
        """Counters for progress displays and benchmarks."""
        return {
            "state": self.state.value,
            "connections": len(self.connections),
            "reconnects": self.reconnects,
            "connections_lost": self.connections_lost,
            "delivery_rate_Bps": self.delivery.rate(now),
            "acked_bytes": self.delivery.total,
            "srtt_s": self.rtt.srtt,
            "min_rtt_s": self.rtt.min_rtt,
            "sent_bytes": sum(s.sent_bytes for s in self.send_channels.values()),
            "resent_bytes": sum(s.resent_bytes for s in self.send_channels.values()),
            "received_bytes": sum(r.received_bytes for r in self.recv_channels.values()),
            "duplicates_dropped": sum(r.duplicates for r in self.recv_channels.values()),
            "wire_bytes_in": self.wire_bytes_in,
            "wire_bytes_out": self.wire_bytes_out,
        }
