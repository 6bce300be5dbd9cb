"""Failure paths of connect/listen through real sockets: every one a typed error."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.transport.stacks import free_port
from xmig.errors import (
    AuthenticationError,
    ConfigError,
    IntegrityError,
    PeerUnreachable,
    PkiError,
    SessionExpired,
)
from xmig.transport import Channel, SessionConfig, connect, listen
from xmig.transport.certs import Issued, PkiPaths, init_pki, issue, make_ca
from xmig.transport.tls import client_context, server_context


async def test_unreachable_peer_is_a_typed_error() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(PeerUnreachable):
        async with asyncio.timeout(10):
            async with connect(
                "127.0.0.1", port, tls=None, insecure_plaintext=True, connect_timeout=0.5
            ):
                pass


async def test_plaintext_needs_the_explicit_flag(pki: PkiPaths) -> None:
    with pytest.raises(ConfigError):
        async with connect("127.0.0.1", 1, tls=None):
            pass
    with pytest.raises(ConfigError):
        async with listen(tls=None):
            pass
    with pytest.raises(ConfigError):
        async with listen(tls=server_context(pki), insecure_plaintext=True):
            pass


async def test_client_cert_from_another_ca_is_refused_before_any_frame(
    pki: PkiPaths, tmp_path: Path
) -> None:
    now = dt.datetime.now(dt.UTC)
    rogue_ca = make_ca(
        "rogue", not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=30)
    )
    rogue = issue(
        rogue_ca,
        "xmig-client",
        server=False,
        not_before=now - dt.timedelta(days=1),
        not_after=now + dt.timedelta(days=30),
    )
    bad_dir = tmp_path / "rogue"
    bad_dir.mkdir()
    for name in ("ca-cert.pem",):
        (bad_dir / name).write_bytes((pki.directory / name).read_bytes())
    rogue.write(bad_dir, "client")
    async with listen(tls=server_context(pki)) as lst:
        with pytest.raises(AuthenticationError):
            async with asyncio.timeout(10):
                async with connect(
                    "127.0.0.1",
                    lst.port,
                    # a rogue client skips its own checks: the server must refuse it anyway
                    tls=client_context(PkiPaths.in_dir(bad_dir, role="client"), check=False),
                    server_hostname="localhost",
                ):
                    pass
        assert lst.refused and all(isinstance(e, AuthenticationError) for e in lst.refused)
        assert not lst.sessions  # no session was created, no frame read


async def test_wrong_host_is_refused(pki: PkiPaths) -> None:
    async with listen(tls=server_context(pki)) as lst:
        with pytest.raises(AuthenticationError, match=r"other\.example"):
            async with asyncio.timeout(10):
                async with connect(
                    "127.0.0.1", lst.port, tls=client_context(pki), server_hostname="other.example"
                ):
                    pass
        assert not lst.sessions


async def test_expired_server_certificate_is_refused(pki: PkiPaths, pki_ca: Issued) -> None:
    now = dt.datetime.now(dt.UTC)
    old = issue(
        pki_ca,
        "localhost",
        names=["localhost"],
        server=True,
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )
    old.write(pki.directory, "server")
    with pytest.raises(PkiError, match=r"server-cert\.pem expired on") as info:
        server_context(pki)  # the server's own check refuses it before listening
    assert info.value.reason == "expired"
    # a server that skipped the check (or whose certificate expired while it ran)
    async with listen(tls=server_context(pki, check=False)) as lst:
        with pytest.raises(AuthenticationError, match="certificate has expired"):
            async with asyncio.timeout(10):
                async with connect(
                    "127.0.0.1", lst.port, tls=client_context(pki), server_hostname="localhost"
                ):
                    pass


async def test_peer_gone_past_the_deadline_fails_the_session(pki: PkiPaths) -> None:
    cfg = SessionConfig(idle_timeout=0.5, resume_deadline=1.0, ping_interval=0.1)
    async with listen(tls=server_context(pki), config=cfg) as lst:
        port = lst.port
        cm = connect(
            "127.0.0.1",
            port,
            tls=client_context(pki),
            server_hostname="localhost",
            config=cfg,
            connect_timeout=0.5,
        )
        client = await cm.__aenter__()
        server = await lst.accept()
        await client.send(Channel.CONTROL, b"hello")
        assert await server.recv(Channel.CONTROL) == b"hello"
    # the listener (and its session) is gone: the client resumes in vain, then fails
    with pytest.raises(SessionExpired):
        async with asyncio.timeout(10):
            await client.recv(Channel.CONTROL)
    await cm.__aexit__(None, None, None)  # leaving a failed session is quiet


async def test_resuming_an_unknown_session_is_refused(pki: PkiPaths) -> None:
    """A destination agent that restarted has lost the session: resume must not pretend."""
    cfg = SessionConfig(idle_timeout=0.5, resume_deadline=20.0, ping_interval=0.1)
    port = free_port()
    async with listen(port=port, tls=server_context(pki), config=cfg) as lst:
        cm = connect(
            "127.0.0.1", port, tls=client_context(pki), server_hostname="localhost", config=cfg
        )
        client = await cm.__aenter__()
        await lst.accept()
    async with listen(port=port, tls=server_context(pki), config=cfg) as lst2:
        with pytest.raises(SessionExpired, match="refused"):
            async with asyncio.timeout(10):
                await client.recv(Channel.CONTROL)
        assert not lst2.sessions
    await cm.__aexit__(None, None, None)


@asynccontextmanager
async def tampering_proxy(target: int, flip_at: int) -> AsyncIterator[int]:
    """A TCP proxy that flips one byte at offset ``flip_at`` of its first connection's
    client-to-server stream; later connections pass untouched."""
    conns = [0]

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns[0] += 1
        tamper = conns[0] == 1
        ur, uw = await asyncio.open_connection("127.0.0.1", target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, flip: bool) -> None:
            offset = 0
            try:
                while data := await src.read(65536):
                    if flip and offset <= flip_at < offset + len(data):
                        buf = bytearray(data)
                        buf[flip_at - offset] ^= 0x01
                        data = bytes(buf)
                    offset += len(data)
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(r, uw, tamper), pipe(ur, w, False))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_tampered_byte_kills_the_connection_and_nothing_tampered_is_delivered(
    pki: PkiPaths,
) -> None:
    msgs = [random.Random(i).randbytes(100_000) for i in range(40)]
    cfg = SessionConfig(idle_timeout=2.0)
    async with (
        listen(tls=server_context(pki), config=cfg) as lst,
        tampering_proxy(lst.port, flip_at=1_000_000) as proxy_port,
        connect(
            "127.0.0.1",
            proxy_port,
            tls=client_context(pki),
            server_hostname="localhost",
            streams=1,
            config=cfg,
        ) as client,
    ):
        server = await lst.accept()
        for m in msgs:
            await client.send(Channel.MEMORY, m)
        async with asyncio.timeout(30):
            got = [await server.recv(Channel.MEMORY) for _ in msgs]
        assert got == msgs
        assert any(isinstance(e, IntegrityError) for e in server.connection_errors)
        assert client.stats()["reconnects"] >= 1


def test_fresh_pki_for_other_names(tmp_path: Path) -> None:
    paths = init_pki(tmp_path / "p", server_names=("10.9.8.7",))
    assert server_context(paths) is not None
