"""TLS 1.3 with mutual authentication over real loopback sockets, and its typed errors."""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import re
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvloop
from cryptography.hazmat.primitives import serialization

from tests.transport.conftest import Endpoint, TlsLink, utc_now
from xmig.errors import (
    AuthenticationError,
    ConfigError,
    ConnectionBroken,
    IntegrityError,
    PkiError,
    TransportError,
)
from xmig.transport.certs import Issued, PkiPaths, issue, make_ca
from xmig.transport.tls import (
    classify_ssl_error,
    client_context,
    peer_identity,
    server_context,
    start_tls_client,
    start_tls_server,
)

DAY = dt.timedelta(days=1)


def _other_ca() -> Issued:
    now = utc_now()
    return make_ca("impostor CA", not_before=now - DAY, not_after=now + DAY)


def _replace(
    pki: PkiPaths, ca: Issued, prefix: str, *, names: tuple[str, ...] = (), expired: bool = False
) -> None:
    """Overwrite ``{prefix}-cert.pem``/``-key.pem`` in ``pki`` with one issued by ``ca``."""
    now = utc_now()
    start, end = (now - 10 * DAY, now - DAY) if expired else (now - DAY, now + DAY)
    server = prefix == "server"
    common_name = "localhost" if server else "xmig-client"
    issued = issue(ca, common_name, names=names, server=server, not_before=start, not_after=end)
    issued.write(pki.directory, prefix)


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@dataclass
class PlainListener:
    """A TCP listener on loopback; ``first`` resolves with the first connected Endpoint."""

    port: int
    first: asyncio.Future[Endpoint]


@asynccontextmanager
async def _plain_listener() -> AsyncIterator[PlainListener]:
    """Accept TCP connections with :class:`Endpoint` protocols; close them all at exit."""
    loop = asyncio.get_running_loop()
    first: asyncio.Future[Endpoint] = loop.create_future()
    accepted: list[Endpoint] = []

    def accept() -> Endpoint:
        endpoint = Endpoint()
        accepted.append(endpoint)
        endpoint.made.add_done_callback(
            lambda _: None if first.done() else first.set_result(endpoint)
        )
        return endpoint

    server = await loop.create_server(accept, "127.0.0.1", 0)
    try:
        yield PlainListener(server.sockets[0].getsockname()[1], first)
    finally:
        for endpoint in accepted:
            if endpoint.transport is not None:
                endpoint.transport.abort()
        server.close()
        await server.wait_closed()


# -- good certificates ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "server_hostname"),
    [
        ("127.0.0.1", "localhost"),
        ("127.0.0.1", "127.0.0.1"),  # an IP address SAN
        pytest.param(
            "::1",
            "::1",
            marks=pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback"),
        ),
    ],
)
async def test_good_certificates_connect_and_exchange_bytes(
    pki: PkiPaths, tls_link: TlsLink, host: str, server_hostname: str
) -> None:
    async with tls_link(
        server_context(pki), client_context(pki), host=host, server_hostname=server_hostname
    ) as link:
        assert not isinstance(link.server, BaseException), link.server
        assert not isinstance(link.client, BaseException), link.client
        assert peer_identity(link.server) == "xmig-client"
        assert peer_identity(link.client) == "localhost"
        for transport in (link.server, link.client):
            assert transport.get_extra_info("ssl_object").version() == "TLSv1.3"
        async with asyncio.timeout(5):
            link.client.write(b"ping" * 1000)
            assert await link.server_app.read(4000) == b"ping" * 1000
            link.server.write(b"pong")
            assert await link.client_app.read(4) == b"pong"


async def test_peer_identity_of_a_plain_transport_is_empty() -> None:
    async with _plain_listener() as listener:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", listener.port)
        assert peer_identity(transport) == ""
        transport.close()


async def test_tls_1_2_peer_is_refused(pki: PkiPaths, tls_link: TlsLink) -> None:
    old_client = client_context(pki)
    old_client.minimum_version = ssl.TLSVersion.TLSv1_2
    old_client.maximum_version = ssl.TLSVersion.TLSv1_2
    async with tls_link(server_context(pki), old_client) as link:
        assert isinstance(link.server, ConnectionBroken), link.server
        assert "unsupported protocol" in str(link.server).lower()
        assert isinstance(link.client, TransportError), link.client
        assert link.server_app.received == b""


# -- refused certificates ------------------------------------------------------------------


async def test_client_certificate_from_another_ca(pki: PkiPaths, tls_link: TlsLink) -> None:
    _replace(pki, _other_ca(), "client")
    async with tls_link(server_context(pki), client_context(pki, check=False)) as link:
        assert isinstance(link.server, AuthenticationError), link.server
        assert "unable to get local issuer certificate" in str(link.server)
        assert isinstance(link.server.__cause__, ssl.SSLCertVerificationError)
        # TLS 1.3: the client's handshake is over before the server judges its certificate,
        # so the client's upgrade succeeds and the refusal arrives on its first read, as an
        # end-of-file (or a reset): asyncio closes without flushing the server's alert.
        assert not isinstance(link.client, BaseException), link.client
        link.client.write(b"secret")
        async with asyncio.timeout(5):
            with pytest.raises((EOFError, ConnectionResetError)) as info:
                await link.client_app.read(1)
            assert isinstance(classify_ssl_error(info.value), ConnectionBroken)
            await link.server_app.lost
        assert link.server_app.received == b""


async def test_server_certificate_from_another_ca(pki: PkiPaths, tls_link: TlsLink) -> None:
    _replace(pki, _other_ca(), "server", names=("localhost",))
    async with tls_link(server_context(pki, check=False), client_context(pki)) as link:
        assert isinstance(link.client, AuthenticationError), link.client
        assert "unable to get local issuer certificate" in str(link.client)
        assert "localhost" in str(link.client)
        # The client hangs up without an alert; the server sees that mid-handshake.
        assert isinstance(link.server, ConnectionBroken), link.server
        assert "during the TLS handshake" in str(link.server)
        assert link.server_app.received == b"" and link.client_app.received == b""


async def test_expired_server_certificate(pki: PkiPaths, pki_ca: Issued, tls_link: TlsLink) -> None:
    _replace(pki, pki_ca, "server", names=("localhost",), expired=True)
    async with tls_link(server_context(pki, check=False), client_context(pki)) as link:
        assert isinstance(link.client, AuthenticationError), link.client
        assert "certificate has expired" in str(link.client)
        assert isinstance(link.server, ConnectionBroken), link.server


async def test_expired_client_certificate(pki: PkiPaths, pki_ca: Issued, tls_link: TlsLink) -> None:
    _replace(pki, pki_ca, "client", expired=True)
    async with tls_link(server_context(pki), client_context(pki, check=False)) as link:
        assert isinstance(link.server, AuthenticationError), link.server
        assert "certificate has expired" in str(link.server)
        assert link.server_app.received == b""


async def test_server_certificate_for_another_host(
    pki: PkiPaths, pki_ca: Issued, tls_link: TlsLink
) -> None:
    _replace(pki, pki_ca, "server", names=("other.example",))
    async with tls_link(
        server_context(pki), client_context(pki), server_hostname="localhost"
    ) as link:
        assert isinstance(link.client, AuthenticationError), link.client
        assert "Hostname mismatch" in str(link.client)
        assert "'localhost'" in str(link.client)
        assert isinstance(link.server, ConnectionBroken), link.server


async def test_client_without_certificate_is_refused(pki: PkiPaths, tls_link: TlsLink) -> None:
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.load_verify_locations(cafile=pki.ca_cert)
    async with tls_link(server_context(pki), anonymous) as link:
        assert isinstance(link.server, AuthenticationError), link.server
        assert "presented no TLS certificate" in str(link.server)
        assert link.server_app.received == b""


# -- peers that do not speak TLS -----------------------------------------------------------


async def test_client_facing_a_non_tls_server(pki: PkiPaths) -> None:
    async with _plain_listener() as listener:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(5):
            transport, app = await loop.create_connection(Endpoint, "127.0.0.1", listener.port)
            banner_side = await listener.first
            assert isinstance(banner_side.transport, asyncio.WriteTransport)
            banner_side.transport.write(b"SSH-2.0-OpenSSH_9.6\r\n" * 20)
            with pytest.raises(ConnectionBroken) as info:
                await start_tls_client(
                    transport, app, client_context(pki), server_hostname="localhost", timeout=3
                )
        assert "did not finish" not in str(info.value)  # refused at once, not by the timeout
        assert isinstance(info.value.__cause__, ssl.SSLError)
        assert transport.is_closing()


async def test_server_facing_a_non_tls_client(pki: PkiPaths) -> None:
    async with _plain_listener() as listener:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            app = await listener.first
            assert app.transport is not None
            with pytest.raises(ConnectionBroken) as info:
                await start_tls_server(app.transport, app, server_context(pki), timeout=3)
            assert "did not finish" not in str(info.value)
            assert isinstance(info.value.__cause__, ssl.SSLError)
            assert await reader.read() == b""  # the server hung up
        assert app.received == b""
        writer.close()
        await writer.wait_closed()


async def test_silent_peer_times_out(pki: PkiPaths) -> None:
    async with _plain_listener() as listener:  # accepts, never answers
        loop = asyncio.get_running_loop()
        transport, app = await loop.create_connection(Endpoint, "127.0.0.1", listener.port)
        async with asyncio.timeout(5):
            with pytest.raises(ConnectionBroken) as info:
                await start_tls_client(
                    transport, app, client_context(pki), server_hostname="localhost", timeout=0.2
                )
        assert "did not finish within 0.2 s" in str(info.value)
        assert isinstance(info.value.__cause__, TimeoutError)
        assert transport.is_closing()


async def test_cancelling_a_handshake_is_not_wrapped(pki: PkiPaths) -> None:
    async with _plain_listener() as listener:  # accepts, never answers
        loop = asyncio.get_running_loop()
        transport, app = await loop.create_connection(Endpoint, "127.0.0.1", listener.port)
        # The outer deadline cancels the handshake: that must stay a cancellation (which
        # asyncio.timeout turns into TimeoutError), not become a ConnectionBroken.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await start_tls_client(
                    transport, app, client_context(pki), server_hostname="localhost", timeout=30
                )
        assert transport.is_closing()


# -- altered bytes -------------------------------------------------------------------------


class TamperingRelay:
    """A TCP relay that flips one bit of the next client-to-server chunk when asked."""

    def __init__(self) -> None:
        self.flip_next = False
        self.flipped = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, target_port: int) -> int:
        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
            for src, dst, tamper in ((reader, up_writer, True), (up_reader, writer, False)):
                task = asyncio.create_task(self._pump(src, dst, tamper))
                self._tasks.add(task)

        self._server = await asyncio.start_server(relay, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, tamper: bool
    ) -> None:
        try:
            while data := await src.read(65536):
                if tamper and self.flip_next:
                    self.flip_next = False
                    data = data[:-1] + bytes([data[-1] ^ 0x01])
                    self.flipped.set()
                dst.write(data)
                await dst.drain()
        except ConnectionError:
            pass
        finally:
            dst.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_altered_record_is_an_integrity_error(pki: PkiPaths, tls_link: TlsLink) -> None:
    relay = TamperingRelay()
    try:
        async with tls_link(server_context(pki), client_context(pki), via=relay.start) as link:
            assert not isinstance(link.client, BaseException), link.client
            assert not isinstance(link.server, BaseException), link.server
            relay.flip_next = True  # the handshake is over: only application records follow
            link.client.write(b"page" * 256)
            async with asyncio.timeout(5):
                await relay.flipped.wait()
                with pytest.raises(ssl.SSLError) as info:
                    await link.server_app.read(1)
            error = classify_ssl_error(info.value, peer="client")
            assert isinstance(error, IntegrityError), error
            assert error.__cause__ is info.value
            assert link.server_app.received == b""
    finally:
        await relay.close()


# -- classification ------------------------------------------------------------------------


def _ssl_error(cls: type[ssl.SSLError], reason: str, text: str) -> ssl.SSLError:
    err = cls(1, f"[SSL: {reason}] {text} (_ssl.c:2580)")
    err.reason = reason  # as OpenSSL would have set it
    return err


_ALERTS = [  # (OpenSSL reason, text, expected type, needle in the message)
    ("TLSV1_ALERT_UNKNOWN_CA", "tlsv1 alert unknown ca", AuthenticationError, "unknown ca"),
    ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "tlsv13 alert certificate required",
     AuthenticationError, "required"),
    ("SSLV3_ALERT_BAD_CERTIFICATE", "sslv3 alert bad certificate", AuthenticationError, "bad"),
    ("SSLV3_ALERT_CERTIFICATE_EXPIRED", "sslv3 alert certificate expired",
     AuthenticationError, "expired"),
    ("DECRYPTION_FAILED_OR_BAD_RECORD_MAC", "decryption failed or bad record mac",
     IntegrityError, "bad record mac"),
    ("TLSV1_ALERT_DECRYPT_ERROR", "tlsv1 alert decrypt error", IntegrityError, "decrypt error"),
    ("WRONG_VERSION_NUMBER", "wrong version number", ConnectionBroken, "wrong version"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("err", "expected", "needle"),
    [
        *[(_ssl_error(ssl.SSLError, r, t), e, n) for r, t, e, n in _ALERTS],
        (ssl.SSLError(1, "tlsv1 alert unknown ca"), AuthenticationError, "unknown ca"),
        (_ssl_error(ssl.SSLEOFError, "UNEXPECTED_EOF_WHILE_READING", "unexpected eof"),
         ConnectionBroken, "unexpected eof"),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
         ConnectionBroken, "reset"),
        (EOFError(), ConnectionBroken, "EOFError"),
        (TimeoutError(), ConnectionBroken, "timed out"),
    ],
)  # fmt: skip
def test_classify_ssl_error(
    err: BaseException, expected: type[TransportError], needle: str
) -> None:
    result = classify_ssl_error(err, peer="dst.example:7800")
    assert type(result) is expected
    assert needle in str(result)
    assert "dst.example:7800" in str(result)
    assert result.__cause__ is err


def test_classify_keeps_verify_message() -> None:
    err = ssl.SSLCertVerificationError(1, "certificate verify failed")
    err.verify_message = "certificate has expired"
    err.verify_code = 10
    result = classify_ssl_error(err)
    assert isinstance(result, AuthenticationError)
    assert "certificate has expired" in str(result)


@pytest.mark.parametrize("err", [asyncio.CancelledError(), KeyboardInterrupt()])
def test_classify_never_wraps_cancellation(err: BaseException) -> None:
    with pytest.raises(type(err)):
        classify_ssl_error(err)


# -- contexts and bad files ----------------------------------------------------------------


def test_contexts_are_tls13_only_and_mutual(pki: PkiPaths) -> None:
    server, client = server_context(pki), client_context(pki)
    assert server.minimum_version == client.minimum_version == ssl.TLSVersion.TLSv1_3
    assert server.verify_mode == client.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname
    assert server.cert_store_stats()["x509_ca"] == 1


@pytest.fixture(params=["server", "client"])
def context_side(request: pytest.FixtureRequest) -> str:
    side: str = request.param
    return side


def _context(side: str, pki: PkiPaths) -> ssl.SSLContext:
    return server_context(pki) if side == "server" else client_context(pki)


@pytest.mark.parametrize("which", ["ca-cert.pem", "cert", "key"])
def test_missing_file_is_a_config_error(pki: PkiPaths, context_side: str, which: str) -> None:
    path = pki.directory / (which if "." in which else f"{context_side}-{which}.pem")
    path.unlink()
    with pytest.raises(ConfigError, match=re.escape(str(path))) as info:
        _context(context_side, pki)
    assert isinstance(info.value.__cause__, FileNotFoundError)


@pytest.mark.parametrize("which", ["ca-cert.pem", "cert", "key"])
def test_garbage_file_is_a_config_error(pki: PkiPaths, context_side: str, which: str) -> None:
    path = pki.directory / (which if "." in which else f"{context_side}-{which}.pem")
    path.write_bytes(b"-----BEGIN NONSENSE-----\nbm9wZQ==\n-----END NONSENSE-----\n")
    with pytest.raises(ConfigError, match=re.escape(str(path))) as info:
        _context(context_side, pki)
    assert info.value.__cause__ is not None


def test_key_of_another_certificate_is_a_config_error(pki: PkiPaths) -> None:
    pki.server_key.write_bytes(pki.client_key.read_bytes())
    with pytest.raises(PkiError, match=re.escape("server-key.pem")) as info:
        server_context(pki)
    assert info.value.reason == "key-mismatch" and info.value.path == str(pki.server_key)
    with pytest.raises(ConfigError, match=re.escape("server-key.pem")) as raw:
        server_context(pki, check=False)  # without the check OpenSSL still refuses it
    assert isinstance(raw.value.__cause__, ssl.SSLError)


def test_encrypted_key_is_a_config_error_not_a_prompt(pki: PkiPaths) -> None:
    key = serialization.load_pem_private_key(pki.client_key.read_bytes(), password=None)
    pki.client_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match=re.escape("client-key.pem")):
        client_context(pki)


def test_ca_file_without_a_ca_is_a_config_error(pki: PkiPaths) -> None:
    pki.ca_cert.write_bytes(pki.client_cert.read_bytes())
    with pytest.raises(ConfigError, match="no CA certificate"):
        server_context(pki)


async def test_client_needs_a_server_hostname(pki: PkiPaths) -> None:
    async with _plain_listener() as listener:
        loop = asyncio.get_running_loop()
        transport, app = await loop.create_connection(Endpoint, "127.0.0.1", listener.port)
        with pytest.raises(ConfigError, match="server's name"):
            await start_tls_client(
                transport, app, client_context(pki), server_hostname="", timeout=1
            )
        transport.close()


# -- uvloop --------------------------------------------------------------------------------


@pytest.fixture
def uvloop_runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        yield runner


def test_under_uvloop(
    pki: PkiPaths, tmp_path: Path, tls_link: TlsLink, uvloop_runner: asyncio.Runner
) -> None:
    """The driver runs on uvloop where installed: same results there."""

    async def good() -> tuple[str, str, bytes]:
        async with tls_link(server_context(pki), client_context(pki)) as link:
            assert not isinstance(link.server, BaseException), link.server
            assert not isinstance(link.client, BaseException), link.client
            link.client.write(b"hello")
            async with asyncio.timeout(5):
                data = await link.server_app.read(5)
            return peer_identity(link.server), peer_identity(link.client), data

    async def refused() -> tuple[BaseException | asyncio.Transport, bytes]:
        async with tls_link(server_context(pki), client_context(pki, check=False)) as link:
            if not isinstance(link.client, BaseException):
                link.client.write(b"secret")
            async with asyncio.timeout(5):
                await link.server_app.lost
            return link.server, bytes(link.server_app.received)

    assert uvloop_runner.run(good()) == ("xmig-client", "localhost", b"hello")
    assert isinstance(uvloop_runner.get_loop(), uvloop.Loop)
    _replace(pki, _other_ca(), "client")
    server_result, received = uvloop_runner.run(refused())
    assert isinstance(server_result, AuthenticationError), server_result
    assert received == b""
