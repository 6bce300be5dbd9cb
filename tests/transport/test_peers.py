"""Who may do what on a listener: --allow patterns, session ownership, per-peer limits.

End-to-end tests use real TLS sockets on loopback and certificates of one CA: the attacker
holds a valid certificate of the CA, as in issue 8.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import shutil
import ssl
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from tests.transport.conftest import utc_now
from xmig.errors import (
    AuthenticationError,
    ConfigError,
    PeerLimitExceeded,
    PeerNotAllowed,
    ProtocolError,
    SessionExpired,
    TransportError,
)
from xmig.transport import Channel, TransportSession, connect, listen
from xmig.transport.certs import Issued, PkiPaths, issue
from xmig.transport.frames import HEADER_SIZE, FrameDecoder, FrameType
from xmig.transport.hello import Hello, refusal
from xmig.transport.peers import HandshakeCounter, PeerIdentity, PeerPolicy
from xmig.transport.session import SessionConfig, SessionState
from xmig.transport.testing import MemoryPair
from xmig.transport.tls import client_context, server_context


def client_pki(pki: PkiPaths, ca: Issued, where: Path, common_name: str,
               names: tuple[str, ...] = ()) -> PkiPaths:
    """A client PKI directory of the same CA with its own certificate."""
    where.mkdir()
    shutil.copy(pki.ca_cert, where / "ca-cert.pem")
    now = utc_now()
    issue(ca, common_name, names=names, server=False, not_before=now - dt.timedelta(days=1),
          not_after=now + dt.timedelta(days=1)).write(where, "client")
    return PkiPaths.in_dir(where, role="client")


def _connect(
    pki: PkiPaths, port: int, **kw: Any
) -> AbstractAsyncContextManager[TransportSession]:
    return connect("127.0.0.1", port, tls=client_context(pki), server_hostname="localhost",
                   connect_timeout=5, **kw)


async def exchange(client: TransportSession, server: TransportSession, data: bytes) -> None:
    """Both directions still work."""
    async with asyncio.timeout(10):
        await client.send(Channel.CONTROL, data)
        assert await server.recv(Channel.CONTROL) == data
        await server.send(Channel.CONTROL, data[::-1])
        assert await client.recv(Channel.CONTROL) == data[::-1]


async def raw_hello(port: int, ctx: ssl.SSLContext, hello: Hello) -> dict[str, object]:
    """Open a TLS connection, send ``hello``, return the server's WELCOME body."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    try:
        writer.write(hello.encode())
        async with asyncio.timeout(10):
            head = await reader.readexactly(HEADER_SIZE)
            decoder = FrameDecoder()
            decoder.feed(head)
            decoder.feed(await reader.readexactly(int.from_bytes(head[8:12], "big")))
        frame = decoder.next_frame()
        assert frame is not None and frame.type is FrameType.WELCOME
        body: dict[str, object] = json.loads(frame.payload)
        return body
    finally:
        writer.close()


# -- policy, identity (sans-IO) ------------------------------------------------------------


def test_policy_defaults_and_validation() -> None:
    policy = PeerPolicy()
    assert (policy.allow, policy.max_sessions, policy.max_connections,
            policy.max_handshakes) == ((), 8, 64, 64)
    assert PeerPolicy(allow=["CN=a"]).allow == ("CN=a",)  # type: ignore[arg-type]
    for bad in ({"max_sessions": 0}, {"max_connections": -1}, {"max_handshakes": True},
                {"allow": "CN=a"}, {"allow": ("",)}):
        with pytest.raises(ConfigError):
            PeerPolicy(**bad)  # type: ignore[arg-type]


def test_allow_patterns_match_subject_and_each_san(pki_ca: Issued) -> None:
    now = utc_now()
    cert = issue(pki_ca, "src.example.net", names=("Src.Example.NET", "10.1.2.3"),
                 server=False, not_before=now, not_after=now + dt.timedelta(days=1)).cert
    der = cert.public_bytes(serialization.Encoding.DER)
    who = PeerIdentity.of_certificate(der, "192.0.2.7")
    assert who.key == f"sha256:{hashlib.sha256(der).hexdigest()}"
    assert who.subject == "CN=src.example.net"
    assert who.names == ("src.example.net", "10.1.2.3")
    assert PeerPolicy().allowed_by(who) == "*"  # no pattern: the CA's whole tree
    for pattern in ("CN=src.*", "*.example.net", "*.EXAMPLE.net", "10.1.2.*", "CN=*"):
        assert PeerPolicy(allow=("CN=dst*", pattern)).allowed_by(who) == pattern
    for pattern in ("CN=dst.example.net", "dst.example.net", "10.1.2.4", "cn=src.*",
                    "src.example"):
        assert PeerPolicy(allow=(pattern,)).allowed_by(who) is None, pattern
    assert "CN=src.example.net" in str(who) and "192.0.2.7" in str(who)


def test_plaintext_identity_is_the_address() -> None:
    who = PeerIdentity.of_address("127.0.0.1")
    assert (who.key, who.authenticated) == ("address:127.0.0.1", False)
    assert PeerPolicy(allow=("127.0.0.*",)).allowed_by(who) == "127.0.0.*"
    assert PeerPolicy(allow=("10.*",)).allowed_by(who) is None


def test_handshake_counter() -> None:
    counter = HandshakeCounter(2)
    assert counter.begin("a") and counter.begin("a") and not counter.begin("a")
    assert counter.begin("b")  # another address has its own budget
    counter.end("a")
    assert counter.held("a") == 1 and counter.begin("a")


@pytest.mark.parametrize(("code", "kind"), [
    ("not-allowed", PeerNotAllowed),
    ("not-owner", AuthenticationError),
    ("peer-limit", PeerLimitExceeded),
    ("unknown-session", SessionExpired),
])
def test_refusal_codes_are_typed_on_the_client(code: str, kind: type[TransportError]) -> None:
    pair = MemoryPair()
    pair.client.add_connection(1, pair.now)
    pair.client.receive_data(1, refusal(code, "because"), pair.now)
    assert pair.client.state is SessionState.ERROR
    assert type(pair.client.error) is kind and "because" in str(pair.client.error)


def test_peer_limit_on_a_resuming_connection_spares_the_session() -> None:
    """Over its connection limit while resuming: that connection is refused, the session
    goes on with its others (and tries again later)."""
    pair = MemoryPair()
    pair.connect(1)
    pair.client.add_connection(2, pair.now)
    with pytest.raises(PeerLimitExceeded):
        pair.client.receive_data(2, refusal("peer-limit", "max_connections"), pair.now)
    assert pair.client.state is SessionState.OPEN and pair.client.connections == [1]


# -- --allow --------------------------------------------------------------------------------


async def test_allow_refuses_a_certificate_matching_no_pattern(
    pki: PkiPaths, pki_ca: Issued, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = client_pki(pki, pki_ca, tmp_path / "src", "src.example.net", ("src.example.net",))
    policy = PeerPolicy(allow=("*.example.net",))
    caplog.set_level(logging.WARNING, logger="xmig.transport.server")
    async with listen(tls=server_context(pki), policy=policy) as lst:
        with pytest.raises(PeerNotAllowed, match="CN=xmig-client") as info:
            async with asyncio.timeout(10), _connect(pki, lst.port, streams=1):
                pass
        assert "not allowed" in str(info.value)
        assert len(lst.refused) == 1 and isinstance(lst.refused[0], PeerNotAllowed)
        assert "CN=xmig-client" in str(lst.refused[0])
        assert not lst.sessions
        assert "*.example.net" in caplog.text  # the operator's log names the patterns
        async with _connect(src, lst.port) as client:  # an allowed one goes on
            async with asyncio.timeout(10):
                server = await lst.accept()
            await exchange(client, server, b"allowed")
            assert server.identity is not None
            assert server.identity.subject == "CN=src.example.net"


async def test_plaintext_allow_matches_the_address() -> None:
    async with listen(tls=None, insecure_plaintext=True,
                      policy=PeerPolicy(allow=("10.*",))) as lst:
        with pytest.raises(PeerNotAllowed, match=r"127\.0\.0\.1"):
            async with asyncio.timeout(10), connect(
                "127.0.0.1", lst.port, tls=None, insecure_plaintext=True, connect_timeout=5
            ):
                pass
        assert not lst.sessions


# -- a session belongs to the certificate that opened it -----------------------------------


async def test_resume_with_another_certificate_is_refused(
    pki: PkiPaths, pki_ca: Issued, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    thief = client_pki(pki, pki_ca, tmp_path / "thief", "xmig-client")  # same name, other key
    async with listen(tls=server_context(pki)) as lst, _connect(pki, lst.port) as client:
        async with asyncio.timeout(10):
            server = await lst.accept()
        sid = client.session.session_id
        conns = set(server._conns)
        # resume (new=False) and join (new=True) with the session's id: both refused
        for new in (False, True):
            body = await raw_hello(lst.port, client_context(thief),
                                   Hello(sid, 0, new, SessionConfig().max_payload))
            assert (body["ok"], body["code"]) == (False, "not-owner")
            assert "another certificate opened it" in str(body["error"])
        # through connect(): a typed AuthenticationError on the thief's side
        monkeypatch.setattr("xmig.transport.client.secrets.token_hex", lambda n=16: sid)
        with pytest.raises(AuthenticationError, match="another certificate") as info:
            async with asyncio.timeout(10), _connect(thief, lst.port, streams=1):
                pass
        assert type(info.value) is AuthenticationError
        assert [type(e) for e in lst.refused] == [AuthenticationError] * 3
        # the session is unaffected: same connections, same peer, still working
        assert set(server._conns) == conns and lst.sessions[sid] is server
        assert server.session.state is SessionState.OPEN
        await exchange(client, server, b"still mine")


# -- per-peer limits -----------------------------------------------------------------------


async def test_session_limit_per_certificate(
    pki: PkiPaths, pki_ca: Issued, tmp_path: Path
) -> None:
    other = client_pki(pki, pki_ca, tmp_path / "other", "other-source")
    policy = PeerPolicy(max_sessions=2)
    async with (
        listen(tls=server_context(pki), policy=policy) as lst,
        _connect(pki, lst.port, streams=1) as c1,
        _connect(pki, lst.port, streams=1) as c2,
    ):
        s1, s2 = await lst.accept(), await lst.accept()
        with pytest.raises(PeerLimitExceeded, match="2 sessions") as info:
            async with asyncio.timeout(10), _connect(pki, lst.port, streams=1):
                pass
        assert "max_sessions" in str(info.value)
        assert isinstance(lst.refused[-1], PeerLimitExceeded)
        assert len(lst.sessions) == 2
        async with _connect(other, lst.port, streams=1) as c3:  # other peers go on
            s3 = await lst.accept()
            await exchange(c3, s3, b"other")
        await exchange(c1, s1, b"one")
        await exchange(c2, s2, b"two")
        async with asyncio.timeout(10):
            await c1.close()
        async with _connect(pki, lst.port, streams=1) as c4:  # the count is released
            s4 = await lst.accept()
            await exchange(c4, s4, b"four")


async def test_connection_limit_per_certificate(pki: PkiPaths) -> None:
    policy = PeerPolicy(max_connections=3)
    async with (
        listen(tls=server_context(pki), policy=policy) as lst,
        _connect(pki, lst.port, streams=3) as c1,
    ):
        async with asyncio.timeout(10):
            s1 = await lst.accept()
            await c1.wait_until(lambda: len(c1.ready_conns) == 3)
        assert s1.identity is not None and lst.held_connections(s1.identity.key) == 3
        with pytest.raises(PeerLimitExceeded, match="3 connections"):
            async with asyncio.timeout(10), _connect(pki, lst.port, streams=1):
                pass
        assert len(lst.sessions) == 1  # the refused one made no session
        await exchange(c1, s1, b"unaffected")


async def test_handshake_limit_per_address(
    pki: PkiPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections that never finish their handshake: a few per address, no more. The
    listener keeps the last few refusals only, without their tracebacks."""
    monkeypatch.setattr("xmig.transport.server.REFUSED_KEPT", 3)
    policy = PeerPolicy(max_handshakes=2)
    async with listen(tls=server_context(pki), policy=policy) as lst:
        idle = [await asyncio.open_connection("127.0.0.1", lst.port) for _ in range(2)]
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", lst.port)
            async with asyncio.timeout(10):
                assert await reader.read() == b""  # closed at once, nothing said
            writer.close()
        assert lst.refused_total == 5 and len(lst.refused) == 3
        assert all(isinstance(e, PeerLimitExceeded) for e in lst.refused)
        assert "max_handshakes" in str(lst.refused[0]) and "127.0.0.1" in str(lst.refused[0])
        assert all(e.__traceback__ is None for e in lst.refused)
        for _, w in idle:
            w.close()
        # once those are gone the address may connect again (connect retries the attempt
        # refused while the server had not yet noticed them closing)
        async with _connect(pki, lst.port) as client:
            async with asyncio.timeout(10):
                server = await lst.accept()
            await exchange(client, server, b"back")


async def test_an_unexpected_failure_admitting_one_connection_spares_the_listener(
    pki: PkiPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with listen(tls=server_context(pki)) as lst:
        with monkeypatch.context() as patch:
            def broken(frame: object) -> Hello:
                raise IndexError("a bug")

            patch.setattr("xmig.transport.server.Hello.decode", broken)
            with pytest.raises(TransportError):
                async with asyncio.timeout(10), _connect(pki, lst.port, streams=1):
                    pass
        assert [type(e) for e in lst.refused] == [ProtocolError]
        assert "IndexError: a bug" in str(lst.refused[0])
        assert isinstance(lst.refused[0].__cause__, IndexError)
        async with _connect(pki, lst.port) as client:  # the listener still takes sessions
            async with asyncio.timeout(10):
                server = await lst.accept()
            await exchange(client, server, b"alive")
