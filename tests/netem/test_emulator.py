"""The emulator process's pieces without a kernel: wire lengths, and its event loop run on
datagram socketpairs standing in for the two TUN devices."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from xmig.netem import LinkSpec
from xmig.netem.emulator import VNET_HDR, Emulator, wire_length


def frame(payload: int, *, gso_size: int = 0, gso_type: int = 1, v6: bool = False) -> bytes:
    """A vnet header + IPv4 (or IPv6) + 32-byte TCP header + payload bytes."""
    hdr = VNET_HDR.pack(1, gso_type if gso_size else 0, 0, gso_size, 0, 0)
    ip = bytes([0x60]) + bytes(39) if v6 else bytes([0x45]) + bytes(19)
    tcp = bytes(12) + bytes([8 << 4]) + bytes(19)
    return hdr + ip + tcp + bytes(payload)


def test_wire_length_of_plain_packets() -> None:
    assert wire_length(frame(1448)) == 1500
    assert wire_length(frame(0)) == 52
    assert wire_length(frame(100, v6=True)) == 40 + 32 + 100


def test_wire_length_of_gso_super_packets() -> None:
    # 10 segments of 1448 bytes: 10 x 1500 on the wire, not 52 + 14480
    assert wire_length(frame(14480, gso_size=1448)) == 15000
    # a short last segment
    assert wire_length(frame(1448 * 3 + 100, gso_size=1448)) == 3 * 1500 + 152
    # TCPv6 (gso_type 4) and the ECN bit
    assert wire_length(frame(2 * 1428, gso_size=1428, gso_type=4 | 0x80, v6=True)) == 2 * 1500
    # a GSO header on a packet that fits one segment
    assert wire_length(frame(1000, gso_size=1448)) == 1052


class Harness:
    """An Emulator on socketpairs: write frames into ``fwd``/``rev``, requests into ``ctl``."""

    def __init__(self, spec: LinkSpec) -> None:
        self.fwd, fwd_inner = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.rev, rev_inner = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        ctl_r, self.ctl_w = os.pipe()
        self.out_r, out_w = os.pipe()
        for sock in (fwd_inner, rev_inner):
            sock.setblocking(False)
        os.set_blocking(ctl_r, False)
        self._keep = (fwd_inner, rev_inner, ctl_r, out_w)
        self.emulator = Emulator(spec, fwd_inner.fileno(), rev_inner.fileno(), ctl_r, out_w)
        self.thread = threading.Thread(target=self.emulator.run, daemon=True)
        self.thread.start()
        self.buf = b""

    def request(self, op: str, **fields: object) -> dict[str, object]:
        os.write(self.ctl_w, (json.dumps({"id": 1, "op": op, **fields}) + "\n").encode())
        while b"\n" not in self.buf:
            ready, _, _ = select.select([self.out_r], [], [], 5)
            assert ready, "no answer from the emulator loop"
            self.buf += os.read(self.out_r, 65536)
        line, self.buf = self.buf.split(b"\n", 1)
        answer: dict[str, object] = json.loads(line)
        return answer

    def close(self) -> None:
        os.close(self.ctl_w)  # EOF ends the loop
        self.thread.join(5)
        assert not self.thread.is_alive()
        for item in (self.fwd, self.rev, *self._keep):
            if isinstance(item, int):
                os.close(item)
            else:
                item.close()
        os.close(self.out_r)


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness(LinkSpec(rate_bps=None, delay_fwd_s=0.030, delay_rev_s=0.060))
    yield h
    h.close()


def recv_within(sock: socket.socket, timeout: float) -> bytes | None:
    ready, _, _ = select.select([sock], [], [], timeout)
    return sock.recv(70000) if ready else None


def test_loop_delays_each_direction_into_the_other_tun(harness: Harness) -> None:
    pkt = frame(100)
    start = time.monotonic()
    harness.fwd.send(pkt)  # kernel -> tun-fwd: src -> dst traffic
    assert recv_within(harness.rev, 1.0) == pkt  # written into tun-rev when due
    fwd_delay = time.monotonic() - start
    start = time.monotonic()
    harness.rev.send(pkt)
    assert recv_within(harness.fwd, 1.0) == pkt
    rev_delay = time.monotonic() - start
    assert 0.029 <= fwd_delay < 0.045
    assert 0.059 <= rev_delay < 0.075


def test_loop_control_requests(harness: Harness) -> None:
    assert harness.request("ping")["ok"] is True
    assert harness.request("cut")["ok"] is True
    harness.fwd.send(frame(100))
    assert recv_within(harness.rev, 0.1) is None
    assert harness.request("restore")["ok"] is True
    spec = LinkSpec(rate_bps=None, delay_fwd_s=0.0, delay_rev_s=0.0)
    assert harness.request("set", spec=spec.to_dict())["ok"] is True
    harness.fwd.send(frame(100))
    assert recv_within(harness.rev, 1.0) is not None
    stats = harness.request("stats")["stats"]
    assert isinstance(stats, dict)
    assert stats["fwd"]["dropped_packets"]["cut"] == 1
    assert stats["fwd"]["forwarded_packets"] == 1
    assert stats["fwd"]["forwarded_bytes"] == 152
    assert stats["cpu_s"] >= 0
    bad = harness.request("frobnicate")
    assert bad["ok"] is False and "frobnicate" in str(bad["error"])
    bad = harness.request("set", spec={"rate_bps": -3})
    assert bad["ok"] is False


def test_emulator_refuses_to_run_without_its_parent() -> None:
    spec = json.dumps(LinkSpec(None, 0.0, 0.0).to_dict())
    not_parent = "1" if os.getpid() != 1 else "2"
    argv = [sys.executable, "-m", "xmig.netem.emulator", "--parent", not_parent, "--spec", spec]
    assert subprocess.run(argv, stdin=subprocess.DEVNULL, timeout=30).returncode == 1
