"""The rate cap and the delivery-rate / RTT estimates, through real sockets and the emulator."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.transport.stacks import Stack, make_stack, session_pair
from xmig.netem import LinkSpec, Wan
from xmig.transport import Channel, SessionConfig
from xmig.transport.certs import init_pki
from xmig.transport.rate import DeliveryRate, RttEstimator, TokenBucket


def test_delivery_rate_over_its_window() -> None:
    rate = DeliveryRate(window=1.0)
    for i in range(1, 21):  # 1 MB every 0.1 s
        rate.on_ack(1_000_000, i * 0.1)
    assert rate.rate(2.0) == pytest.approx(10e6, rel=0.01)
    assert rate.rate(5.0) == 0.0 or rate.rate(5.0) < 1e6  # nothing acknowledged lately


def test_rtt_estimator_keeps_the_minimum() -> None:
    rtt = RttEstimator()
    for sample in (0.2, 0.25, 0.21, 0.3):
        rtt.on_sample(sample)
    assert rtt.min_rtt == 0.2
    assert rtt.srtt is not None and 0.2 < rtt.srtt < 0.3


def test_token_bucket_paces_to_its_rate() -> None:
    bucket = TokenBucket(rate=1000.0, burst=100.0, now=0.0)
    sent, now = 0, 0.0
    while now < 10.0:
        if bucket.allows(now):
            bucket.spend(50, now)
            sent += 50
        else:
            ready = bucket.next_ready()
            assert ready is not None and ready > now
            now = ready
    assert sent == pytest.approx(10_000, rel=0.02)


async def test_rate_cap_is_never_exceeded_end_to_end(tmp_path: Path) -> None:
    cap_bps = 64_000_000  # 8 MB/s
    total = 8 << 20
    cfg = SessionConfig(rate_cap_bps=cap_bps, max_payload=256 << 10)
    with make_stack("tls", tmp_path) as stack:
        async with session_pair(stack, streams=2, config=cfg) as (client, server):
            t0 = time.monotonic()

            async def produce() -> None:
                for _ in range(total // (256 << 10)):
                    await client.send(Channel.DISK_BULK, bytes(256 << 10))

            async def consume() -> int:
                n = 0
                while n < total:
                    n += len(await server.recv(Channel.DISK_BULK))
                return n

            async with asyncio.timeout(30):
                _, n = await asyncio.gather(produce(), consume())
            elapsed = time.monotonic() - t0
    # a lower bound on time, not an upper: the cap may not be beaten (one burst allowed)
    assert n == total
    assert elapsed >= (total - cfg.max_payload) * 8 / cap_bps * 0.95


@pytest.mark.root
async def test_estimates_follow_the_emulated_link(tmp_path: Path) -> None:
    spec = LinkSpec.symmetric(rate_bps=100_000_000, rtt_s=0.04)
    cfg = SessionConfig(ping_interval=0.1)
    with Wan(spec, fallback="tun") as wan:
        stack = Stack("tls-netem", init_pki(tmp_path / "pki", server_names=(wan.dst_addr,)), wan)
        async with session_pair(stack, streams=2, config=cfg) as (client, server):

            async def produce() -> None:
                for _ in range(48):
                    await client.send(Channel.MEMORY, bytes(1 << 20))

            async def consume() -> None:
                for _ in range(48):
                    await server.recv(Channel.MEMORY)

            async with asyncio.timeout(60):
                await asyncio.gather(produce(), consume())
            st = client.stats()
    assert st["min_rtt_s"] == pytest.approx(0.04, rel=0.15)
    # acked bytes per second over the last second, against 100 Mbit/s of IP bytes
    assert 0.6 * 12.5e6 < st["delivery_rate_Bps"] < 1.05 * 12.5e6
