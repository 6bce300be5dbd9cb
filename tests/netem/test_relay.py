"""The no-root fallback: the loopback relay (run here even as root, with fallback="relay")."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator

import pytest

from tests.netem.helpers import bulk_goodput, connected_pair, median_rtt
from xmig.errors import NetemPermissionError
from xmig.netem import LinkSpec, Wan, wan
from xmig.netem import link as link_module

SPEC = LinkSpec.symmetric(rate_bps=100_000_000, rtt_s=0.040)


@pytest.fixture
def relay() -> Iterator[Wan]:
    with pytest.warns(UserWarning, match="approximate"):
        link = wan(SPEC, fallback="relay")
    with link:
        yield link


def test_relay_says_it_is_approximate(relay: Wan) -> None:
    assert relay.approximate is True and relay.mode == "relay"
    assert relay.src_addr == relay.dst_addr == "127.0.0.1"
    assert relay.stats()["mode"] == "relay"


def test_auto_falls_back_to_the_relay_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(link_module, "tun_available", lambda: False)
    with pytest.warns(UserWarning, match="no root"):
        link = Wan(SPEC)
    assert link.approximate is True
    with pytest.raises(NetemPermissionError):
        Wan(SPEC, fallback="tun")


def test_auto_falls_back_when_the_kernel_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    from xmig.netem import tunlink

    def refuse(self: tunlink.TunLink) -> None:
        raise NetemPermissionError("unshare(CLONE_NEWNET): Operation not permitted")

    monkeypatch.setattr(link_module, "tun_available", lambda: True)
    monkeypatch.setattr(tunlink.TunLink, "start", refuse)
    with pytest.warns(UserWarning, match="refused"), Wan(SPEC) as link:
        assert link.mode == "relay" and link.approximate
    with pytest.raises(NetemPermissionError):
        Wan(SPEC, fallback="tun").start()


def test_relay_rtt(relay: Wan) -> None:
    assert median_rtt(relay, count=10) == pytest.approx(0.040, rel=0.05)
    relay.set(dataclasses.replace(SPEC, delay_fwd_s=0.050, delay_rev_s=0.030))
    assert median_rtt(relay, count=10) == pytest.approx(0.080, rel=0.05)


def test_relay_rate(relay: Wan) -> None:
    result = bulk_goodput(relay, warmup_s=0.5, window_s=1.5)
    # the relay charges payload x 1500/1448, so the same conversion applies
    assert result.wire_estimate_bps == pytest.approx(100_000_000, rel=0.05)


def test_relay_cut_holds_bytes_until_restore(relay: Wan) -> None:
    client, server = connected_pair(relay)
    with client, server:
        relay.cut()
        assert relay.stats()["cut"] is True
        client.sendall(b"held")
        server.settimeout(0.3)
        with pytest.raises(TimeoutError):
            server.recv(10)
        relay.restore()
        server.settimeout(5)
        assert server.recv(10) == b"held"


def test_relay_connect_during_a_cut_reaches_the_server_only_after_restore(relay: Wan) -> None:
    listener = relay.socket("dst")
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    endpoint = relay.dst_endpoint(listener.getsockname()[1])
    relay.cut()
    with listener, relay.socket("src") as client:
        client.settimeout(5)
        client.connect(endpoint)  # accepted by the relay on loopback
        listener.settimeout(0.3)
        with pytest.raises(TimeoutError):
            listener.accept()
        relay.restore()
        listener.settimeout(5)
        conn, _ = listener.accept()
        with conn:
            client.sendall(b"hello")
            assert conn.recv(10) == b"hello"
            conn.sendall(b"back")
            assert client.recv(10) == b"back"
            client.shutdown(socket.SHUT_WR)
            assert conn.recv(10) == b""  # EOF travels too


def test_relay_programs_stop_at_close() -> None:
    with pytest.warns(UserWarning), wan(SPEC, fallback="relay") as link:
        sleeper = link.popen("dst", ["sleep", "600"])
    assert sleeper.poll() is not None
