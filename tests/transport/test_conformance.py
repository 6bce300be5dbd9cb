"""The conformance suite: every stack moves messages the same way, exactly once, in order."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.transport.stacks import Stack, make_stack, session_pair
from xmig.errors import ConnectionClosed
from xmig.transport import Channel, SessionConfig, TransportSession

STACKS = ["plain", "tls", "tls-relay", pytest.param("tls-netem", marks=pytest.mark.root)]


@pytest.fixture(params=STACKS)
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    with make_stack(request.param, tmp_path) as s:
        yield s


def blobs(seed: int, count: int, max_size: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randint(0, max_size)) for _ in range(count)]


async def test_every_channel_both_ways_in_order(stack: Stack) -> None:
    async with session_pair(stack, streams=3) as (client, server):
        for ch in Channel:
            for src, dst, seed in ((client, server, ch), (server, client, 100 + ch)):
                msgs = blobs(seed, 20, 70_000)
                for m in msgs:
                    await src.send(ch, m)
                got = [await dst.recv(ch) for _ in msgs]
                assert got == msgs


async def test_interleaved_channels_keep_their_own_order(stack: Stack) -> None:
    async with session_pair(stack, streams=4) as (client, server):
        rng = random.Random(7)
        sent: dict[int, list[bytes]] = {ch: [] for ch in Channel}
        for i in range(400):
            ch = rng.choice(list(Channel))
            m = b"%d:" % i + rng.randbytes(rng.randint(0, 30_000))
            sent[ch].append(m)
            await client.send(ch, m)

        async def drain(ch: int) -> list[bytes]:
            return [await server.recv(ch) for _ in sent[ch]]

        async with asyncio.timeout(30):
            got = await asyncio.gather(*(drain(ch) for ch in Channel))
        assert dict(zip(Channel, got, strict=True)) == sent


async def test_32_mib_digest_over_four_streams(stack: Stack) -> None:
    data = random.Random(3).randbytes(1 << 20)
    async with session_pair(stack, streams=4) as (client, server):
        want = hashlib.sha256()

        async def produce() -> None:
            for i in range(32):
                chunk = bytes([i]) + data[1:]
                want.update(chunk)
                await client.send(Channel.DISK_BULK, chunk)

        async def consume() -> str:
            got = hashlib.sha256()
            for _ in range(32):
                got.update(await server.recv(Channel.DISK_BULK))
            return got.hexdigest()

        async with asyncio.timeout(60):
            _, digest = await asyncio.gather(produce(), consume())
        assert digest == want.hexdigest()
        assert client.stats()["duplicates_dropped"] == 0


async def test_orderly_close(stack: Stack) -> None:
    async with session_pair(stack) as (client, server):
        msgs = blobs(5, 10, 100_000)
        for m in msgs:
            await client.send(Channel.MEMORY, m)
        closing = asyncio.create_task(client.close("done"))
        got = [await server.recv(Channel.MEMORY) for _ in msgs]
        assert got == msgs
        async with asyncio.timeout(10):
            await closing
        with pytest.raises(ConnectionClosed):
            await server.recv(Channel.MEMORY)
        with pytest.raises(ConnectionClosed):
            await client.send(Channel.MEMORY, b"after close")


def abort_all(session: TransportSession) -> int:
    conns = list(session._conns.values())
    for proto in conns:
        assert proto.transport is not None
        proto.transport.abort()  # a reset, as the network would do it
    return len(conns)


async def test_reset_connections_resume_without_loss_or_duplicates(stack: Stack) -> None:
    cfg = SessionConfig(idle_timeout=2.0, resume_deadline=20.0)
    msgs = blobs(11, 300, 200_000)
    async with session_pair(stack, streams=3, config=cfg) as (client, server):

        async def produce() -> None:
            for i, m in enumerate(msgs):
                await client.send(Channel.MEMORY, m)
                if i in (60, 150, 240):
                    assert abort_all(client) >= 1

        async def consume() -> list[bytes]:
            return [await server.recv(Channel.MEMORY) for _ in msgs]

        async with asyncio.timeout(60):
            _, got = await asyncio.gather(produce(), consume())
        assert got == msgs  # nothing lost, nothing twice, in order
        st = client.stats()
        assert st["reconnects"] >= 3
        assert st["connections_lost"] >= 3
