"""Shared helpers of the netem tests: waiting without sleeping, measuring, finding leftovers."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

from xmig.netem import Wan

#: Payload bytes per 1500-byte IP packet of a TCP stream with timestamps (20 IP + 32 TCP).
GOODPUT_TO_WIRE = 1500 / 1448


class LineReader:
    """Lines from a pipe fd, each awaited with a timeout (no sleeping, no blocking forever)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(0.0, left))
            if not ready:
                raise TimeoutError(f"no line within {timeout} s (so far {self.buf!r})")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise EOFError(f"EOF (so far {self.buf!r})")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def wait_for(self, prefix: str, timeout: float) -> tuple[str, list[str]]:
        """Read lines until one starts with ``prefix``; return it and the lines before."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            line = self.readline(max(0.0, deadline - time.monotonic()))
            if line.startswith(prefix):
                return line, seen
            seen.append(line)


def wait_pid_exit(pid: int, timeout: float) -> bool:
    """True once process ``pid`` has exited (waits on a pidfd), False after ``timeout``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)


def netns_holders(inodes: set[int]) -> list[str]:
    """Everything that still refers to the network namespaces ``inodes``: process and thread
    namespaces, open fds, bind mounts. Empty means the kernel has freed them."""
    wanted = {f"net:[{ino}]" for ino in inodes}
    found = []
    # a thread of ours that Python joined can linger in /proc for a moment while the kernel
    # ends it (join returns before the task is gone): only live threads hold anything
    ours = {str(t.native_id) for t in threading.enumerate()}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        links = [f"/proc/{pid}/ns/net"]
        with contextlib.suppress(OSError):
            links += [f"/proc/{pid}/task/{t}/ns/net" for t in os.listdir(f"/proc/{pid}/task")
                      if int(pid) != os.getpid() or t in ours]
        with contextlib.suppress(OSError):
            links += [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
        for link in links:
            with contextlib.suppress(OSError):
                if os.readlink(link) in wanted:
                    found.append(link)
    with open("/proc/self/mountinfo") as f:
        found += [line.strip() for line in f if any(w in line for w in wanted)]
    return found


def connected_pair(wan: Wan, *, nodelay: bool = True) -> tuple[socket.socket, socket.socket]:
    """A TCP connection across the link: (client in src, server side in dst)."""
    listener = wan.socket("dst")
    listener.bind(("0.0.0.0", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    client = wan.socket("src")
    client.settimeout(10)
    client.connect(wan.dst_endpoint(port))
    listener.settimeout(10)
    server, _ = listener.accept()
    listener.close()
    for sock in (client, server):
        sock.settimeout(10)
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, server


def ping_pong(client: socket.socket, server: socket.socket, count: int) -> list[float]:
    """Round-trip times of ``count`` one-byte request/response exchanges."""
    rtts = []
    for _ in range(count):
        start = time.monotonic()
        client.sendall(b"?")
        assert server.recv(1) == b"?"
        server.sendall(b"!")
        assert client.recv(1) == b"!"
        rtts.append(time.monotonic() - start)
    return rtts


def median_rtt(wan: Wan, count: int = 12, warmup: int = 2) -> float:
    client, server = connected_pair(wan)
    with client, server:
        ping_pong(client, server, warmup)
        return statistics.median(ping_pong(client, server, count))


@dataclass
class Goodput:
    """A bulk transfer's goodput over a window after its start, and the emulator's view."""

    goodput_bps: float
    window_s: float
    stats_before: dict[str, Any]
    stats_after: dict[str, Any]

    @property
    def wire_estimate_bps(self) -> float:
        return self.goodput_bps * GOODPUT_TO_WIRE

    @property
    def counted_wire_bps(self) -> float:
        """IP bytes the emulator forwarded src -> dst per second over the window."""
        after, before = self.stats_after["fwd"], self.stats_before["fwd"]
        return float((after["forwarded_bytes"] - before["forwarded_bytes"]) * 8 / self.window_s)

    def emulator_cpu(self, key: str = "cpu_s") -> float:
        """Cores the emulator used during the window."""
        return float((self.stats_after[key] - self.stats_before[key]) / self.window_s)


def bulk_goodput(wan: Wan, *, warmup_s: float, window_s: float, cc: str = "cubic") -> Goodput:
    """Send src -> dst as fast as TCP goes; measure received bytes from ``warmup_s`` on."""
    client, server = connected_pair(wan, nodelay=False)
    with contextlib.suppress(OSError):
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
    stop = threading.Event()

    def send() -> None:
        chunk = bytes(4 << 20)
        with contextlib.suppress(OSError):
            while not stop.is_set():
                client.sendall(chunk)

    sender = threading.Thread(target=send, daemon=True)
    buf = bytearray(4 << 20)
    received = 0
    with client, server:
        start = time.monotonic()
        sender.start()
        window_start = start + warmup_s
        while (now := time.monotonic()) < window_start:
            received += server.recv_into(buf)
        base, t0, before = received, now, wan.stats()
        while (now := time.monotonic()) < t0 + window_s:
            received += server.recv_into(buf)
        after, elapsed = wan.stats(), now - t0
        stop.set()
        client.shutdown(socket.SHUT_RDWR)
    sender.join(10)
    return Goodput((received - base) * 8 / elapsed, elapsed, before, after)
