"""Driving a running link: cut and restore, set, loss, queue bound, programs in the hosts."""

from __future__ import annotations

import dataclasses
import errno
import math
import select
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.netem.helpers import connected_pair, median_rtt, wait_pid_exit
from xmig.netem import LinkSpec, Wan

pytestmark = pytest.mark.root


@pytest.fixture
def wan() -> Iterator[Wan]:
    with Wan(LinkSpec.symmetric(rate_bps=100_000_000, rtt_s=0.020), fallback="tun") as link:
        yield link


def start_connect(wan: Wan, port: int) -> socket.socket:
    sock = wan.socket("src")
    sock.setblocking(False)
    assert sock.connect_ex(wan.dst_endpoint(port)) == errno.EINPROGRESS
    return sock


def connected_within(sock: socket.socket, timeout: float) -> bool:
    _, writable, _ = select.select([], [sock], [], timeout)
    if writable:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    return bool(writable)


def test_a_connect_during_a_cut_completes_only_after_restore(wan: Wan) -> None:
    listener = wan.socket("dst")
    listener.bind(("0.0.0.0", 0))
    listener.listen()
    wan.cut()
    with listener, start_connect(wan, listener.getsockname()[1]) as client:
        assert not connected_within(client, 0.6), "a SYN got through a cut link"
        wan.restore()
        assert connected_within(client, 5.0)  # the SYN retransmission gets through
    stats = wan.stats()
    assert stats["fwd"]["dropped_packets"]["cut"] >= 1
    assert stats["cut"] is False


def test_an_established_connection_stalls_during_a_cut(wan: Wan) -> None:
    client, server = connected_pair(wan)
    with client, server:
        wan.cut()
        client.sendall(b"during the cut")
        server.settimeout(0.5)
        with pytest.raises(TimeoutError):
            server.recv(100)
        wan.restore()
        server.settimeout(5)
        assert server.recv(100) == b"during the cut"  # retransmitted after restore


def test_set_changes_the_delay_promptly(wan: Wan) -> None:
    assert median_rtt(wan, count=5) == pytest.approx(0.020, rel=0.15)
    wan.set(dataclasses.replace(wan.spec, delay_fwd_s=0.040, delay_rev_s=0.020))
    assert wan.spec.rtt_s == pytest.approx(0.060)
    assert median_rtt(wan, count=5) == pytest.approx(0.060, rel=0.1)
    assert wan.stats()["spec"]["delay_fwd_s"] == 0.040


def udp_pair(wan: Wan) -> tuple[socket.socket, socket.socket]:
    rx = wan.socket("dst", type=socket.SOCK_DGRAM)
    rx.bind(("0.0.0.0", 0))
    tx = wan.socket("src", type=socket.SOCK_DGRAM)
    tx.connect(wan.dst_endpoint(rx.getsockname()[1]))
    return tx, rx


def count_received(rx: socket.socket, idle_s: float) -> int:
    got = 0
    while select.select([rx], [], [], idle_s)[0]:
        rx.recv(2000)
        got += 1
    return got


def test_random_loss_drops_about_the_configured_fraction(wan: Wan) -> None:
    wan.set(LinkSpec.symmetric(rate_bps=None, rtt_s=0.0, loss=0.3, seed=11))
    tx, rx = udp_pair(wan)
    with tx, rx:
        for _ in range(400):
            tx.send(b"x" * 100)
        got = count_received(rx, 0.2)
    fwd = wan.stats()["fwd"]
    dropped = fwd["dropped_packets"]["loss"]
    assert fwd["offered_packets"] == 400
    assert fwd["forwarded_packets"] == 400 - dropped
    assert 80 <= dropped <= 160  # 30 % of 400 = 120, sigma 9
    assert got <= 400 - dropped  # (the receiver's socket buffer may overflow as well)


def test_the_queue_bound_tail_drops_a_burst(wan: Wan) -> None:
    # 1 Mbit/s: a 1000-byte datagram (1028 IP bytes) takes ~8.2 ms; the queue holds 10 of them.
    # Whatever the link drains while the burst is still being sent also gets through, so the
    # bound allows one more datagram per 8.2 ms the burst took (a loaded CI box sends slowly).
    per_packet_s = 1028 * 8 / 1_000_000
    wan.set(LinkSpec.symmetric(rate_bps=1_000_000, rtt_s=0.0, queue_bytes=10_280))
    tx, rx = udp_pair(wan)
    with tx, rx:
        started = time.monotonic()
        for _ in range(50):
            tx.send(b"x" * 1000)
        burst_s = time.monotonic() - started
        got = count_received(rx, 0.2)
    stats = wan.stats()["fwd"]
    drained_during_burst = math.ceil(burst_s / per_packet_s)
    assert 9 <= got <= 12 + drained_during_burst
    assert got < 50
    assert stats["dropped_packets"]["queue"] == 50 - got
    assert stats["forwarded_bytes"] == got * 1028


def test_programs_run_in_their_host_and_stop_at_close() -> None:
    with Wan(LinkSpec.symmetric(rate_bps=None, rtt_s=0.0), fallback="tun") as wan:
        out = wan.popen("src", ["cat", "/proc/net/dev"], stdout=subprocess.PIPE)
        text, _ = out.communicate(timeout=10)
        ifaces = {line.split(":")[0].strip() for line in text.decode().splitlines()[2:]}
        assert ifaces == {"lo", "wan0"}
        sleeper = wan.popen("dst", ["sleep", "600"])
        with pytest.raises(FileNotFoundError):
            wan.popen("dst", ["no-such-program-here"])
    assert wait_pid_exit(sleeper.pid, 5)
    assert sleeper.poll() is not None
