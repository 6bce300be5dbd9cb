"""Fixtures for transport tests: a fresh PKI, and TLS links over real loopback sockets.

``pki`` is a complete PKI directory made by :func:`init_pki` (CA, server for localhost /
127.0.0.1 / ::1, client ``xmig-client``). ``pki_ca`` is that PKI's CA (certificate and key), to
issue replacement certificates. ``tls_link`` opens one TCP connection on loopback and upgrades
both ends concurrently with :func:`start_tls_server` / :func:`start_tls_client`::

    async with tls_link(server_context(pki), client_context(pki)) as link:
        assert isinstance(link.client, asyncio.Transport)   # or the typed error it raised
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from xmig.transport.certs import CA_CERT, CA_KEY, Issued, PkiPaths, init_pki
from xmig.transport.tls import start_tls_client, start_tls_server


@pytest.fixture
def pki(tmp_path: Path) -> PkiPaths:
    """A fresh PKI directory with QEMU's file names."""
    return init_pki(tmp_path / "pki")


@pytest.fixture
def pki_ca(pki: PkiPaths) -> Issued:
    """The CA of ``pki``, to issue more certificates with."""
    assert (pki.directory / CA_CERT).exists() and (pki.directory / CA_KEY).exists()
    return Issued.load(pki.directory, "ca")


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Endpoint(asyncio.Protocol):
    """An application protocol that records what it gets. Reading starts paused."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received = bytearray()
        self.eof = False
        loop = asyncio.get_running_loop()
        self.made: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[BaseException | None] = loop.create_future()
        self._changed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's: a cast, not an isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()  # nothing may be consumed before the TLS upgrade
        self.made.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.received += data
        self._changed.set()

    def eof_received(self) -> bool | None:
        self.eof = True
        self._changed.set()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)
        self._changed.set()

    async def read(self, n: int) -> bytes:
        """Wait until ``n`` bytes came; raise the connection's error (or EOFError) first."""
        while len(self.received) < n:
            if self.lost.done():
                exc = self.lost.result()
                raise exc if exc is not None else EOFError("connection closed")
            self._changed.clear()
            await self._changed.wait()
        data = bytes(self.received[:n])
        del self.received[:n]
        return data


@dataclass
class Link:
    """The outcome of one loopback TLS upgrade: each side's TLS transport or its error."""

    server: asyncio.Transport | BaseException
    client: asyncio.Transport | BaseException
    server_app: Endpoint
    client_app: Endpoint
    port: int


@asynccontextmanager
async def _tls_link(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    *,
    server_hostname: str = "localhost",
    host: str = "127.0.0.1",
    handshake_timeout: float = 5.0,
    via: Callable[[int], Awaitable[int]] | None = None,
) -> AsyncIterator[Link]:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Endpoint] = loop.create_future()

    def accept() -> Endpoint:
        endpoint = Endpoint()
        if not accepted.done():
            accepted.set_result(endpoint)
        return endpoint

    server = await loop.create_server(accept, host, 0)
    port = server.sockets[0].getsockname()[1]
    opened: list[asyncio.Transport] = []
    try:
        connect_port = port if via is None else await via(port)
        async with asyncio.timeout(handshake_timeout * 2):
            _, client_app = await loop.create_connection(Endpoint, host, connect_port)
            server_app = await accepted
            await server_app.made
        assert client_app.transport is not None and server_app.transport is not None
        opened += [client_app.transport, server_app.transport]
        server_result, client_result = await asyncio.gather(
            start_tls_server(
                server_app.transport, server_app, server_ctx, timeout=handshake_timeout
            ),
            start_tls_client(
                client_app.transport,
                client_app,
                client_ctx,
                server_hostname=server_hostname,
                timeout=handshake_timeout,
            ),
            return_exceptions=True,
        )
        opened += [t for t in (server_result, client_result) if not isinstance(t, BaseException)]
        yield Link(server_result, client_result, server_app, client_app, port)
    finally:
        for transport in opened:
            transport.abort()
        server.close()
        await server.wait_closed()


TlsLink = Callable[..., AbstractAsyncContextManager[Link]]


@pytest.fixture
def tls_link() -> TlsLink:
    """``tls_link(server_ctx, client_ctx, *, server_hostname, host, handshake_timeout, via)``.

    ``via(port)``, if given, is awaited with the server's port and returns the port the client
    connects to instead (a relay in the middle).
    """
    return _tls_link
