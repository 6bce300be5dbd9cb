"""The session state machine, without sockets: two endpoints joined in memory."""

from __future__ import annotations

import random

import pytest

from xmig.errors import ConnectionClosed, ProtocolError, SessionExpired, StateError
from xmig.transport.channels import Channel
from xmig.transport.frames import FrameDecoder, FrameType, encode_frame
from xmig.transport.session import (
    ConnectionDead,
    ConnectionReady,
    Hello,
    MessageReceived,
    PeerClosed,
    SessionConfig,
    SessionFailed,
    SessionState,
)
from xmig.transport.testing import MemoryPair


def received(pair: MemoryPair, channel: int) -> list[bytes]:
    return [
        e.data for e in MemoryPair.events(pair.server)
        if isinstance(e, MessageReceived) and e.channel == channel
    ]


def consume_all(pair: MemoryPair, msgs: list[bytes], channel: int) -> None:
    for m in msgs:
        pair.server.consume(channel, len(m), pair.now)


def test_handshake_exact_frames() -> None:
    pair = MemoryPair()
    pair.connect(1)
    # WELCOME, then each side probes the RTT at once, before any data can queue
    assert [(d, f.type) for d, f in pair.wire] == [
        ("s->c", FrameType.WELCOME),
        ("s->c", FrameType.PING),
        ("c->s", FrameType.PING),
        ("c->s", FrameType.PONG),
        ("s->c", FrameType.PONG),
    ]
    assert pair.client.state is SessionState.OPEN
    assert pair.server.state is SessionState.OPEN
    assert MemoryPair.events(pair.client) == [ConnectionReady(1)]


def test_messages_arrive_in_order_with_exact_frames_and_acks() -> None:
    pair = MemoryPair()
    pair.connect(1)
    pair.wire.clear()
    for i in range(3):
        pair.client.send(Channel.MEMORY, b"m%d" % i)
    pair.flush(1)
    assert [(f.type, f.channel, f.seq, f.payload) for _, f in pair.wire] == [
        (FrameType.DATA, Channel.MEMORY, i, b"m%d" % i) for i in range(3)
    ]
    msgs = received(pair, Channel.MEMORY)
    assert msgs == [b"m0", b"m1", b"m2"]
    assert pair.client.send_channels[Channel.MEMORY].inflight_bytes == 6
    consume_all(pair, msgs, Channel.MEMORY)
    pair.now += 0.01  # past the ack delay
    pair.server.handle_timer(pair.now)
    pair.wire.clear()
    pair.flush(1)
    assert [(f.type, f.channel, f.seq) for _, f in pair.wire] == [
        (FrameType.ACK, Channel.MEMORY, 3)
    ]
    assert pair.client.send_channels[Channel.MEMORY].inflight_bytes == 0
    assert pair.client.all_acked


def test_control_frames_go_before_queued_bulk() -> None:
    pair = MemoryPair()
    pair.connect(1)
    pair.wire.clear()
    for _ in range(4):
        pair.client.send(Channel.DISK_BULK, b"b" * 1000)
    pair.client.send(Channel.MEMORY, b"m")
    pair.client.send(Channel.CONTROL, b"c")
    pair.client.send(Channel.DEVICE_STATE, b"d")
    pair.flush(1)
    channels = [f.channel for _, f in pair.wire if f.type is FrameType.DATA]
    assert channels[:3] == [Channel.CONTROL, Channel.DEVICE_STATE, Channel.MEMORY]


def test_memory_and_bulk_share_by_weight() -> None:
    pair = MemoryPair()
    pair.connect(1)
    pair.wire.clear()
    for _ in range(40):
        pair.client.send(Channel.DISK_BULK, b"b" * 1000)
        pair.client.send(Channel.MEMORY, b"m" * 1000)
    sent = []
    for _ in range(40):
        frame = pair.client.frame_to_send(1, pair.now)
        assert frame is not None
        sent.append(frame[0][4])  # the channel byte of the header
    # weights 3:1 -> 30 memory, 10 bulk among the first 40 frames (neither starves)
    assert sent.count(Channel.MEMORY) == 30
    assert sent.count(Channel.DISK_BULK) == 10


def serve(pair: MemoryPair, frames: int) -> list[tuple[int, int]]:
    """The next ``frames`` data frames the client sends, as (channel, payload bytes)."""
    out = []
    for _ in range(frames):
        frame = pair.client.frame_to_send(1, pair.now)
        assert frame is not None
        out.append((frame[0][4], len(frame[1])))  # the channel byte of the header
    return out


def byte_shares(sent: list[tuple[int, int]]) -> dict[int, float]:
    total = sum(n for _, n in sent)
    return {ch: sum(n for c, n in sent if c == ch) / total for ch in {c for c, _ in sent}}


DATA_CHANNELS = (Channel.DISK_MIRROR, Channel.MEMORY, Channel.DISK_BULK)


def test_mirror_memory_and_bulk_share_by_weight_exactly() -> None:
    """Weights mirror 2 : memory 3 : bulk 1, equal frames: every 6 frames are 2 mirror,
    3 memory, 1 bulk, in this exact order (ties go in channel order)."""
    pair = MemoryPair()
    pair.connect(1)
    for _ in range(300):
        for ch in DATA_CHANNELS:
            pair.client.send(ch, b"x" * 1000)
    sent = [ch for ch, _ in serve(pair, 600)]
    M, m, b = Channel.DISK_MIRROR, Channel.MEMORY, Channel.DISK_BULK
    assert sent[:12] == [M, m, b, m, M, m] * 2
    assert [sent.count(ch) for ch in DATA_CHANNELS] == [200, 300, 100]


def test_shares_follow_weights_with_mixed_frame_sizes() -> None:
    """Shares are of bytes, not frames: seeded random frame sizes, all three backlogged,
    then only mirror and bulk (memory idle): bulk keeps its share, 1/3 of the link."""
    rnd = random.Random(11)
    pair = MemoryPair()
    pair.connect(1)
    for _ in range(1500):
        for ch in DATA_CHANNELS:
            pair.client.send(ch, rnd.randbytes(rnd.randrange(512, 16384)))
    shares = byte_shares(serve(pair, 1500))
    assert shares[Channel.DISK_MIRROR] == pytest.approx(2 / 6, abs=0.01)
    assert shares[Channel.MEMORY] == pytest.approx(3 / 6, abs=0.01)
    assert shares[Channel.DISK_BULK] == pytest.approx(1 / 6, abs=0.01)

    pair = MemoryPair()
    pair.connect(1)
    for _ in range(1500):
        for ch in (Channel.DISK_MIRROR, Channel.DISK_BULK):
            pair.client.send(ch, rnd.randbytes(rnd.randrange(512, 16384)))
    shares = byte_shares(serve(pair, 1500))
    assert set(shares) == {Channel.DISK_MIRROR, Channel.DISK_BULK}
    assert shares[Channel.DISK_BULK] == pytest.approx(1 / 3, abs=0.01)


def test_a_channel_back_from_idle_banks_no_credit() -> None:
    """Memory and bulk send alone for a while; when the mirror gets a backlog it takes its
    share at once, but no more: it does not make up for the time it was idle (a mirror
    idle for minutes must not then hold the link for minutes)."""
    pair = MemoryPair()
    pair.connect(1)
    for _ in range(400):
        pair.client.send(Channel.MEMORY, b"m" * 1000)
        pair.client.send(Channel.DISK_BULK, b"b" * 1000)
    serve(pair, 200)
    for _ in range(400):
        pair.client.send(Channel.DISK_MIRROR, b"d" * 1000)
    sent = [ch for ch, _ in serve(pair, 60)]
    assert sent[0] == Channel.DISK_MIRROR  # served at once...
    assert sent.count(Channel.DISK_MIRROR) == pytest.approx(20, abs=1)  # ...at its share
    assert sent.count(Channel.MEMORY) == pytest.approx(30, abs=1)
    assert sent.count(Channel.DISK_BULK) == pytest.approx(10, abs=1)


def test_control_and_device_state_go_before_a_backlogged_mirror() -> None:
    pair = MemoryPair()
    pair.connect(1)
    for _ in range(20):
        pair.client.send(Channel.DISK_MIRROR, b"d" * 1000)
    serve(pair, 5)
    pair.client.send(Channel.DEVICE_STATE, b"s")
    pair.client.send(Channel.CONTROL, b"c")
    assert [ch for ch, _ in serve(pair, 3)] == [
        Channel.CONTROL, Channel.DEVICE_STATE, Channel.DISK_MIRROR]


def test_window_bounds_bytes_in_flight() -> None:
    from xmig.transport.channels import ChannelSpec, frame_charge

    spec = (
        ChannelSpec(Channel.CONTROL, 0, window=4096),
        ChannelSpec(Channel.MEMORY, 3, window=3 * frame_charge(1000)),
    )
    pair = MemoryPair(SessionConfig(channels=spec, max_payload=2048))
    pair.connect(1)
    for _ in range(5):
        pair.client.send(Channel.MEMORY, b"x" * 1000)
    pair.flush(1)
    msgs = received(pair, Channel.MEMORY)
    assert len(msgs) == 3  # 3 x (1000 + overhead) in flight, the rest waits for acks
    consume_all(pair, msgs, Channel.MEMORY)
    pair.now += 1
    pair.server.handle_timer(pair.now)
    pair.flush(1)
    assert len(received(pair, Channel.MEMORY)) == 2


def test_lost_connection_resends_on_another_without_duplicates() -> None:
    pair = MemoryPair()
    pair.connect(1)
    pair.connect(2)
    for i in range(10):
        pair.client.send(Channel.MEMORY, b"%d" % i)
    # frames for conn 1 vanish with it (a cut), conn 2 delivers its share
    pair.flush(1, drop=True)
    pair.client.connection_lost(1, pair.now)
    pair.server.connection_lost(1, pair.now)
    pair.flush(2)
    msgs = received(pair, Channel.MEMORY)
    assert msgs == [b"%d" % i for i in range(10)]
    assert pair.client.send_channels[Channel.MEMORY].resent_bytes > 0


def test_duplicate_frame_is_dropped_and_changes_nothing() -> None:
    pair = MemoryPair()
    pair.connect(1)
    pair.client.send(Channel.MEMORY, b"once")
    pair.flush(1)
    assert received(pair, Channel.MEMORY) == [b"once"]
    replay = encode_frame(FrameType.DATA, Channel.MEMORY, 0, b"once")
    pair.server.receive_data(1, replay, pair.now)
    assert received(pair, Channel.MEMORY) == []
    assert pair.server.recv_channels[Channel.MEMORY].duplicates == 1


def test_protocol_violations_raise_typed_errors() -> None:
    pair = MemoryPair()
    pair.connect(1)
    with pytest.raises(ProtocolError):
        pair.server.receive_data(1, encode_frame(FrameType.DATA, 99, 0, b"x"), pair.now)
    with pytest.raises(ProtocolError):
        pair.client.receive_data(1, encode_frame(FrameType.ACK, Channel.MEMORY, 5), pair.now)
    with pytest.raises(ProtocolError):
        pair.server.receive_data(1, encode_frame(FrameType.HELLO, 0, 0, b"{}"), pair.now)
    assert pair.server.state is SessionState.OPEN


def test_silent_connection_is_declared_dead_then_session_expires() -> None:
    cfg = SessionConfig(idle_timeout=2.0, resume_deadline=5.0)
    pair = MemoryPair(cfg)
    pair.connect(1)
    MemoryPair.events(pair.client)
    pair.now = 2.5
    pair.client.handle_timer(pair.now)
    evs = MemoryPair.events(pair.client)
    assert len(evs) == 1 and isinstance(evs[0], ConnectionDead) and evs[0].conn == 1
    assert pair.client.state is SessionState.DISCONNECTED
    pair.now = 7.6
    pair.client.handle_timer(pair.now)
    (failed,) = MemoryPair.events(pair.client)
    assert isinstance(failed, SessionFailed) and isinstance(failed.error, SessionExpired)
    assert pair.client.state is SessionState.ERROR
    with pytest.raises(SessionExpired):
        pair.client.send(Channel.MEMORY, b"late")
    with pytest.raises(StateError):  # ERROR is sticky
        pair.client.add_connection(3, pair.now)


def test_pings_measure_rtt() -> None:
    pair = MemoryPair(SessionConfig(ping_interval=0.5))
    pair.connect(1)
    pair.now = 0.6
    pair.client.handle_timer(pair.now)
    frame = pair.client.frame_to_send(1, pair.now)
    assert frame is not None
    pair.server.receive_data(1, frame[0], pair.now)
    pair.now = 0.65
    pong = pair.server.frame_to_send(1, pair.now)
    assert pong is not None
    pair.client.receive_data(1, pong[0], pair.now)
    assert pair.client.rtt.latest == pytest.approx(0.05)
    assert pair.client.rtt.min_rtt == 0.0  # the probe at connection time (no time passed)


def test_orderly_close() -> None:
    pair = MemoryPair()
    pair.connect(1)
    pair.client.send(Channel.MEMORY, b"last")
    pair.client.close("done")
    assert pair.client.state is SessionState.CLOSING
    with pytest.raises(ConnectionClosed):
        pair.client.send(Channel.MEMORY, b"too late")
    pair.flush(1)
    consume_all(pair, received(pair, Channel.MEMORY), Channel.MEMORY)
    pair.now += 1
    pair.server.handle_timer(pair.now)
    pair.flush(1)  # ack -> client sends CLOSE -> server answers CLOSE
    assert pair.client.state is SessionState.CLOSED
    assert pair.server.state is SessionState.CLOSED
    assert PeerClosed("done") in MemoryPair.events(pair.server)


def test_rate_cap_holds_bulk_but_not_control() -> None:
    pair = MemoryPair(SessionConfig(rate_cap_bps=8 * 100_000, max_payload=10_000))
    pair.connect(1)
    for _ in range(5):
        pair.client.send(Channel.MEMORY, b"x" * 10_000)
    first = pair.client.frame_to_send(1, pair.now)  # the burst allows one frame
    assert first is not None
    assert pair.client.frame_to_send(1, pair.now) is None
    pair.client.send(Channel.CONTROL, b"urgent")
    ctl = pair.client.frame_to_send(1, pair.now)
    assert ctl is not None and ctl[1] == b"urgent"
    # the burst (one frame) is spent; afterwards one 10 kB frame per 0.1 s at 100 kB/s
    t1 = pair.client.get_timer()
    assert t1 is not None and t1 < 0.001
    pair.now = t1
    assert pair.client.frame_to_send(1, pair.now) is not None
    assert pair.client.frame_to_send(1, pair.now) is None
    t2 = pair.client.get_timer()
    assert t2 is not None and t2 - t1 == pytest.approx(0.1, abs=0.001)


def test_a_cap_set_at_run_time_paces_data_never_above_the_configured_one() -> None:
    pair = MemoryPair(SessionConfig(max_payload=10_000))
    pair.connect(1)
    for _ in range(5):
        pair.client.send(Channel.MEMORY, b"x" * 10_000)
    pair.client.set_rate_cap(8 * 100_000, pair.now)  # 100 kB/s: a 10 kB frame per 0.1 s
    assert pair.client.frame_to_send(1, pair.now) is not None  # the burst
    assert pair.client.frame_to_send(1, pair.now) is None
    t1 = pair.client.get_timer()
    assert t1 is not None
    pair.now = t1
    assert pair.client.frame_to_send(1, pair.now) is not None
    pair.client.set_rate_cap(None, pair.now)  # lifted: nothing holds data back
    assert pair.client.frame_to_send(1, pair.now) is not None
    assert pair.client.frame_to_send(1, pair.now) is not None
    capped = MemoryPair(SessionConfig(rate_cap_bps=8 * 100_000, max_payload=10_000))
    capped.client.set_rate_cap(8e9, 0.0)  # an operator's --bandwidth stays the ceiling
    assert capped.client.bucket is not None and capped.client.bucket.rate == 100_000
    capped.client.set_rate_cap(None, 0.0)
    assert capped.client.bucket is not None and capped.client.bucket.rate == 100_000


def test_timer_never_reports_what_it_already_handled() -> None:
    """An ack due while no connection can carry it must not make the timer spin."""
    pair = MemoryPair(SessionConfig(ping_interval=10.0, idle_timeout=30.0))
    pair.connect(1)
    pair.client.send(Channel.MEMORY, b"x")
    pair.flush(1)
    received(pair, Channel.MEMORY)
    pair.server.consume(Channel.MEMORY, 1, pair.now)
    pair.server.connection_lost(1, pair.now)  # the ack has nowhere to go
    pair.now = 1.0
    pair.server.handle_timer(pair.now)
    timer = pair.server.get_timer()
    assert timer is not None and timer > pair.now


def test_resume_skips_what_the_peer_already_holds() -> None:
    """On reconnect each side tells what it holds; only the rest is sent again."""
    pair = MemoryPair()
    pair.connect(1)
    for i in range(6):
        pair.client.send(Channel.MEMORY, b"%d" % i)
    pair.flush(1)  # all six arrive, none consumed (so none acknowledged)
    assert len(received(pair, Channel.MEMORY)) == 6
    pair.client.connection_lost(1, pair.now)
    pair.server.connection_lost(1, pair.now)
    assert len(pair.client.send_channels[Channel.MEMORY].retransmit) == 6
    pair.wire.clear()
    pair.connect(2)
    assert FrameType.DATA not in [f.type for _, f in pair.wire]  # no DATA sent again
    assert pair.client.send_channels[Channel.MEMORY].resent_bytes == 0
    assert pair.client.send_channels[Channel.MEMORY].inflight_bytes == 6  # still unacked


def test_lost_frames_wait_for_a_connection_heard_from_lately() -> None:
    """After an outage the surviving connection may be cut off too: do not pile the lost
    frames onto it (they would be lost again) until it proves alive."""
    pair = MemoryPair(SessionConfig(idle_timeout=2.0, ping_interval=10.0))
    pair.connect(1)
    pair.connect(2)
    for i in range(4):
        pair.client.send(Channel.MEMORY, b"%d" % i)
    pair.flush(1, drop=True)  # everything went out on conn 1 and vanished
    pair.now = 1.5  # conn 2 silent for 1.5 s > idle_timeout / 2
    pair.client.connection_lost(1, pair.now)
    pair.server.connection_lost(1, pair.now)
    assert pair.client.frame_to_send(2, pair.now) is None  # held back
    pair.client.receive_data(2, encode_frame(FrameType.PING, 0, 99), pair.now)  # alive
    pair.wire.clear()
    pair.flush(2)
    assert received(pair, Channel.MEMORY) == [b"0", b"1", b"2", b"3"]


def test_new_data_follows_hello_before_welcome_and_lost_frames_wait_for_it() -> None:
    """On a resuming connection new data goes right behind HELLO (a round trip earlier,
    so slow start begins sooner); what was lost waits for WELCOME's account of what the
    peer holds, so nothing the peer has is sent again, and all arrives once, in order."""
    pair = MemoryPair(SessionConfig(idle_timeout=2.0, ping_interval=10.0))
    pair.connect(1)
    for i in range(4):
        pair.client.send(Channel.MEMORY, b"%d" % i)
    pair.flush(1)  # 0-3 delivered, their acks not yet sent
    for i in range(4, 6):
        pair.client.send(Channel.MEMORY, b"%d" % i)
    pair.flush(1, drop=True)  # 4 and 5 vanish with the link
    pair.now = 2.5
    pair.client.connection_lost(1, pair.now)
    pair.server.connection_lost(1, pair.now)
    for i in range(6, 8):
        pair.client.send(Channel.MEMORY, b"%d" % i)
    pair.client.add_connection(2, pair.now)
    out = []
    while (frame := pair.client.frame_to_send(2, pair.now)) is not None:
        out.append(frame[0] + frame[1])
    dec = FrameDecoder()
    for data in out:
        dec.feed(data)
    frames = list(iter(dec.next_frame, None))
    # HELLO, then only the never-sent 6 and 7: not 4 and 5 (lost: they wait), nor 0-3
    assert [(f.type, f.seq) for f in frames] == [
        (FrameType.HELLO, 0), (FrameType.DATA, 6), (FrameType.DATA, 7)
    ]
    hello = Hello.decode(frames[0])
    pair.server.add_connection(2, pair.now, hello=hello)
    for data in out[1:]:
        pair.server.receive_data(2, data, pair.now)
    pair.wire.clear()
    pair.flush(2)
    resent = [f.seq for d, f in pair.wire if d == "c->s" and f.type is FrameType.DATA]
    assert resent == [4, 5]
    assert received(pair, Channel.MEMORY) == [b"%d" % i for i in range(8)]
    assert pair.server.recv_channels[Channel.MEMORY].duplicates == 0
    assert pair.client.send_channels[Channel.MEMORY].resent_bytes == 2
