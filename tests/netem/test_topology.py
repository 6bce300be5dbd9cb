"""The three-namespace link: built, reachable, and gone afterwards, also after a crash."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from tests.netem.helpers import LineReader, connected_pair, netns_holders, wait_pid_exit
from xmig.netem import LinkSpec, Wan

pytestmark = pytest.mark.root

SPEC = LinkSpec.symmetric(rate_bps=100_000_000, rtt_s=0.010)


def test_link_is_built_reachable_and_torn_down() -> None:
    host_ifaces = set(socket.if_nameindex())
    with Wan(SPEC, fallback="tun") as wan:
        assert wan.mode == "tun" and wan.approximate is False
        assert (wan.src_addr, wan.dst_addr) == ("10.231.1.2", "10.231.2.2")
        inodes = wan.link.netns_inodes()
        assert len(set(inodes.values())) == 3
        emulator = wan.link.emulator_pid
        client, server = connected_pair(wan)
        with client, server:
            assert client.getsockname()[0] == wan.src_addr
            assert server.getpeername()[0] == wan.src_addr
            assert server.getsockname()[0] == wan.dst_addr
        # large TCP buffers in both hosts
        for side in ("src", "dst"):
            cat = wan.popen(
                side,
                ["cat", "/proc/sys/net/ipv4/tcp_rmem", "/proc/sys/net/ipv4/tcp_wmem"],
                stdout=subprocess.PIPE,
            )
            out, _ = cat.communicate(timeout=10)
            assert [line.split()[2] for line in out.decode().splitlines()] == ["67108864"] * 2
        # nothing appeared in the host's namespace
        assert set(socket.if_nameindex()) == host_ifaces
    assert wait_pid_exit(emulator, 10)
    assert netns_holders(set(inodes.values())) == []


def test_two_links_do_not_collide() -> None:
    with Wan(SPEC, fallback="tun") as one, Wan(SPEC, fallback="tun") as two:
        one.cut()
        client, server = connected_pair(two)
        client.close()
        server.close()
        assert one.stats()["cut"] is True and two.stats()["cut"] is False


CRASHER = textwrap.dedent(
    """
    import json, sys
    from xmig.netem import LinkSpec, Wan
    wan = Wan(LinkSpec.symmetric(rate_bps=None, rtt_s=0.01), fallback="tun").start()
    child = wan.popen("dst", ["sleep", "600"])
    listener = wan.socket("dst")
    listener.bind(("0.0.0.0", 5001)); listener.listen()
    print(json.dumps({"emulator": wan.link.emulator_pid, "child": child.pid,
                      "inodes": list(wan.link.netns_inodes().values())}), flush=True)
    sys.stdin.read()
    """
)


def test_nothing_is_left_after_the_creator_is_killed() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        info = json.loads(LineReader(proc.stdout.fileno()).readline(timeout=30))
        assert netns_holders(set(info["inodes"]))  # alive while the creator is
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert wait_pid_exit(info["emulator"], 10), "the emulator outlived its parent"
    assert wait_pid_exit(info["child"], 10), "a program run in the link outlived its parent"
    assert netns_holders(set(info["inodes"])) == []
