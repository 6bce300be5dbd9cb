"""The receive window counts every frame: floods of empty or tiny frames stay bounded.

Each DATA frame counts its payload plus ``FRAME_OVERHEAD`` in its channel's window, on both
sides; a peer that sends past ``1.5 × window`` is cut off with a :class:`ProtocolError`
before the receiver queues more than ``1.5 × window ÷ FRAME_OVERHEAD`` messages.
"""

from __future__ import annotations

import asyncio
import ssl
import tracemalloc

import pytest

from xmig.errors import ProtocolError
from xmig.transport import Channel, SessionConfig, listen
from xmig.transport.certs import PkiPaths
from xmig.transport.channels import (
    FRAME_OVERHEAD,
    OVERRUN_FACTOR,
    ChannelSpec,
    frame_charge,
)
from xmig.transport.frames import FrameType, encode_frame
from xmig.transport.session import Hello, MessageReceived
from xmig.transport.testing import MemoryPair
from xmig.transport.tls import client_context, server_context

SMALL = (
    ChannelSpec(Channel.CONTROL, priority=0, window=64 * 1024),
    ChannelSpec(Channel.MEMORY, priority=3, window=256 * 1024),
)


def most_held(window: int, payload: int = 0) -> int:
    """The most messages of ``payload`` bytes a receiver holds before it calls an overrun."""
    return int(window * OVERRUN_FACTOR) // frame_charge(payload)


def flood(channel: int, count: int, payload: bytes = b"", first: int = 0) -> bytes:
    return b"".join(
        encode_frame(FrameType.DATA, channel, seq, payload) for seq in range(first, first + count)
    )


@pytest.mark.parametrize("payload", [b"", b"x", b"0123456789abcdef"])
@pytest.mark.parametrize("spec", SMALL, ids=lambda s: Channel(s.channel).name)
def test_sans_io_flood_of_tiny_frames_is_cut_off(spec: ChannelSpec, payload: bytes) -> None:
    pair = MemoryPair(SessionConfig(channels=SMALL, max_payload=4096))
    pair.connect(1)
    MemoryPair.events(pair.server)
    limit = most_held(spec.window, len(payload))
    assert limit < 3 * spec.window // max(len(payload), 1)  # counting payloads only allowed more
    with pytest.raises(ProtocolError, match="overran the window") as info:
        pair.server.receive_data(1, flood(spec.channel, 10 * limit, payload), pair.now)
    assert f"{limit + 1} messages" in str(info.value)
    delivered = [e for e in MemoryPair.events(pair.server) if isinstance(e, MessageReceived)]
    rc = pair.server.recv_channels[spec.channel]
    assert len(delivered) == rc.buffered_frames == limit
    assert rc.buffered_charge <= spec.window * OVERRUN_FACTOR
    assert rc.buffered_bytes == limit * len(payload)


def test_sans_io_sender_keeps_tiny_messages_within_the_window() -> None:
    """A legitimate sender of many empty messages never overruns the receiver: it counts
    them the same way, so it stops at the window and goes on as acks come back."""
    pair = MemoryPair(SessionConfig(channels=SMALL, max_payload=4096))
    pair.connect(1)
    MemoryPair.events(pair.server)
    window = SMALL[1].window
    per_window = window // FRAME_OVERHEAD
    total = 5 * per_window
    for _ in range(total):
        pair.client.send(Channel.MEMORY, b"")
    got = 0
    rounds = 0
    while got < total:
        rounds += 1
        pair.flush(1)
        batch = [e for e in MemoryPair.events(pair.server) if isinstance(e, MessageReceived)]
        assert batch, "the sender stalled"
        sc = pair.client.send_channels[Channel.MEMORY]
        assert sc.inflight_charge <= window
        assert len(batch) <= per_window
        assert pair.server.recv_channels[Channel.MEMORY].buffered_charge <= window
        for _ in batch:
            pair.server.consume(Channel.MEMORY, 0, pair.now)
        got += len(batch)
        pair.now += 0.01
        pair.server.handle_timer(pair.now)
    assert got == total and rounds >= 5
    pair.flush(1)
    assert pair.client.all_acked
    assert pair.client.send_channels[Channel.MEMORY].inflight_charge == 0


def test_sans_io_ping_flood_queues_one_pong() -> None:
    """PINGs from a peer that never reads its PONGs: one PONG waits, the latest."""
    pair = MemoryPair()
    pair.connect(1)
    pings = b"".join(encode_frame(FrameType.PING, 0, i) for i in range(1, 50_001))
    pair.server.receive_data(1, pings, pair.now)
    out = []
    while (frame := pair.server.frame_to_send(1, pair.now)) is not None:
        out.append(frame[0] + frame[1])
    assert out == [encode_frame(FrameType.PONG, 0, 50_000)]


async def test_tls_flood_of_tiny_frames_is_bounded(pki: PkiPaths) -> None:
    """A hostile client with a valid certificate floods the control channel with one-byte
    frames over real TLS: its connection is cut with ProtocolError once the window's count
    is reached, the server holds at most that many messages, and its memory stays small
    (counting payload bytes only, the 500,000 messages would all have been queued)."""
    count = 500_000
    limit = most_held(4 * 1024 * 1024, 1)  # the control channel's default window
    data = flood(Channel.CONTROL, count, b"x")
    async with listen(tls=server_context(pki)) as lst:
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1", lst.port, ssl=client_context(pki), server_hostname="localhost"
        )
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            hello = Hello("f" * 32, 0, True, SessionConfig().max_payload)
            writer.write(hello.encode())
            async with asyncio.timeout(30):
                server = await lst.accept()
                try:
                    for start in range(0, len(data), 1 << 20):
                        writer.write(data[start : start + (1 << 20)])
                        await writer.drain()
                except (ConnectionError, ssl.SSLError):
                    pass  # the server cut us off mid-flood
                await server.wait_until(lambda: bool(server.connection_errors))
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
            writer.close()
        errors = server.connection_errors
        assert any(isinstance(e, ProtocolError) and "overran" in str(e) for e in errors), errors
        held = server.session.recv_channels[Channel.CONTROL].buffered_frames
        assert held == len(server._inbox[Channel.CONTROL]) == limit
        assert grown < 16 * 1024 * 1024, grown  # ~45 B per held message, not per sent one
        assert limit < count // 10
