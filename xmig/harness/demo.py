"""The demo: until a guest can be migrated (next issue), a whole transport session over an
emulated WAN link, with a cut of the link in the middle that the session rides out.

The library part emits :class:`DemoProgress` snapshots; the CLI renders them.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from xmig.netem import LinkSpec, Wan
from xmig.netem.sessions import connect_across, listen_across
from xmig.transport import Channel, SessionConfig
from xmig.transport.certs import init_pki
from xmig.transport.tls import client_context, server_context

CHUNK = 1 << 20


@dataclass(frozen=True)
class DemoProgress:
    """One snapshot of the demo's session, as the source sees it."""

    elapsed_s: float
    acked_bytes: int
    total_bytes: int
    delivery_rate_Bps: float
    min_rtt_ms: float | None
    connections: int
    reconnects: int
    link_cut: bool


async def run_transport_demo(
    spec: LinkSpec,
    *,
    total_bytes: int,
    streams: int = 2,
    cut_seconds: float = 2.0,
    seed: int = 1,
    on_progress: Callable[[DemoProgress], None] = lambda p: None,
) -> dict[str, Any]:
    """Send ``total_bytes`` over an emulated link with TLS, cutting the link once at half
    way for ``cut_seconds``; return the figures and whether the data arrived intact."""
    config = SessionConfig(idle_timeout=1.0, ping_interval=0.2, resume_deadline=30.0)
    base = random.Random(seed).randbytes(CHUNK)
    with tempfile.TemporaryDirectory() as tmp, Wan(spec) as wan:
        pki = init_pki(Path(tmp) / "pki", server_names=(wan.dst_addr, "127.0.0.1"))
        async with (listen_across(wan, tls=server_context(pki), config=config) as lst,
                    connect_across(wan, lst.port, tls=client_context(pki), streams=streams,
                                   config=config) as src):
            dst = await lst.accept()
            sent, got = hashlib.sha256(), hashlib.sha256()
            t0 = time.monotonic()
            cut = asyncio.Event()

            async def produce() -> None:
                for i in range(total_bytes // CHUNK):
                    chunk = i.to_bytes(8, "big") + base[8:]
                    sent.update(chunk)
                    await src.send(Channel.MEMORY, chunk)

            async def consume() -> int:
                n = 0
                while n < total_bytes // CHUNK * CHUNK:
                    got.update(await dst.recv(Channel.MEMORY))
                    n += CHUNK
                    if n == total_bytes // 2 // CHUNK * CHUNK and cut_seconds > 0:
                        cut.set()
                return n

            async def cutter() -> None:
                await cut.wait()
                wan.cut()
                await asyncio.sleep(cut_seconds)  # the length of the outage, by design
                wan.restore()

            async def report() -> None:
                while True:
                    st = src.stats()
                    on_progress(DemoProgress(
                        time.monotonic() - t0, st["acked_bytes"], total_bytes,
                        st["delivery_rate_Bps"],
                        st["min_rtt_s"] * 1000 if st["min_rtt_s"] else None,
                        st["connections"], st["reconnects"], wan.stats()["cut"]))
                    await asyncio.sleep(0.25)  # a display refresh period

            tasks = [asyncio.create_task(c) for c in (report(), cutter())]
            try:
                _, received = await asyncio.gather(produce(), consume())
                await src.drain()
            finally:
                for t in tasks:
                    t.cancel()
            elapsed = time.monotonic() - t0
            st = src.stats()
    return {
        "mode": "transport-demo",
        "link": spec.to_dict(),
        "approximate_link": wan.approximate,
        "bytes": received,
        "total_s": elapsed,
        "goodput_bps": received * 8 / elapsed,
        "verified": sent.hexdigest() == got.hexdigest(),
        "cut_s": cut_seconds,
        "reconnects": st["reconnects"],
        "resent_bytes": st["resent_bytes"],
        "min_rtt_ms": st["min_rtt_s"] * 1000 if st["min_rtt_s"] else None,
    }


def progress_dict(p: DemoProgress) -> dict[str, Any]:
    return {"event": "progress", **asdict(p)}
