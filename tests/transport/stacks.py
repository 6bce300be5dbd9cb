"""The stacks every transport implementation must pass the conformance suite on.

A stack says how a listener is made and how a client reaches it: plain TCP on loopback
(the explicit benchmark-only mode), TLS on loopback, TLS through the no-root relay, and
TLS through the TUN WAN emulator between network namespaces (root).
"""

from __future__ import annotations

import asyncio
import socket
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from xmig.netem import LinkSpec, Wan
from xmig.transport import SessionConfig, TransportSession, connect, listen
from xmig.transport.certs import PkiPaths, init_pki
from xmig.transport.tls import client_context, server_context


@dataclass
class Stack:
    name: str
    pki: PkiPaths | None
    wan: Wan | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def listen_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.pki is None:
            kw["tls"], kw["insecure_plaintext"] = None, True
        else:
            kw["tls"] = server_context(self.pki)
        if self.wan is not None and not self.wan.approximate:
            sock = self.wan.socket("dst")
            sock.bind(("0.0.0.0", 0))
            sock.listen(64)
            sock.setblocking(False)
            kw["sock"] = sock
        return kw

    def connect_args(self, port: int) -> tuple[str, int, dict[str, Any]]:
        kw: dict[str, Any] = {}
        if self.pki is None:
            kw["tls"], kw["insecure_plaintext"] = None, True
        else:
            kw["tls"] = client_context(self.pki)
        host, port_ = "127.0.0.1", port
        if self.wan is not None:
            host, port_ = self.wan.dst_endpoint(port)
            if not self.wan.approximate:
                wan = self.wan
                kw["socket_factory"] = lambda: wan.socket("src")
        kw["server_hostname"] = "127.0.0.1" if self.wan is None or self.wan.approximate else host
        return host, port_, kw


@contextmanager
def make_stack(name: str, tmp: Any) -> Iterator[Stack]:
    if name == "plain":
        yield Stack(name, None)
        return
    if name == "tls":
        yield Stack(name, init_pki(tmp / "pki"))
        return
    spec = LinkSpec.symmetric(rate_bps=None, rtt_s=0.004)
    relay = name == "tls-relay"
    with warnings.catch_warnings(record=True) as said, Wan(
        spec, fallback="relay" if relay else "tun"
    ) as wan:
        warnings.simplefilter("always")
        assert wan.approximate == relay
        assert relay == any("approximate" in str(w.message) for w in said)
        names = ("127.0.0.1",) if wan.approximate else (wan.dst_addr,)
        yield Stack(name, init_pki(tmp / "pki", server_names=names), wan)


@asynccontextmanager
async def session_pair(
    stack: Stack, *, streams: int = 2, config: SessionConfig | None = None
) -> AsyncIterator[tuple[TransportSession, TransportSession]]:
    """A connected (client, server) pair of sessions over ``stack``."""
    async with listen(config=config, **stack.listen_kwargs()) as lst:
        host, port, kw = stack.connect_args(lst.port)
        async with connect(host, port, streams=streams, config=config, connect_timeout=10,
                           **kw) as client:
            async with asyncio.timeout(10):
                server = await lst.accept()
            yield client, server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
