"""The WAN emulator process: two TUN devices in the middle namespace and a packet scheduler.

Started by :class:`xmig.netem.link.Wan` from a thread inside the middle namespace (so it is
born there)::

    python -m xmig.netem.emulator --parent PID --spec JSON [--tun-fwd NAME --tun-rev NAME]

It opens the two TUN devices (``IFF_TUN | IFF_NO_PI | IFF_VNET_HDR`` with TSO/CSUM offloads,
so it moves up to 64 KiB GSO super-packets while TCP keeps a 1448-byte MSS on the 1500-byte
links), prints one JSON line ``{"event": "ready", ...}`` on stdout and then serves JSON-line
requests on stdin, one answer line each on stdout:

``{"id": 1, "op": "set", "spec": {...LinkSpec...}}``, ``{"id": 2, "op": "cut"}``,
``{"id": 3, "op": "restore"}``, ``{"id": 4, "op": "stats"}``, ``{"id": 5, "op": "ping"}``
→ ``{"id": N, "ok": true, ...}`` or ``{"id": N, "ok": false, "error": "..."}``.

Packets the kernel routes into the forward TUN (src → dst traffic) are written, when due,
into the reverse TUN and vice versa; either way they re-enter the namespace's stack and leave
by its main routing table. The rate is charged on wire bytes: a GSO super-packet counts as its
IP length plus (segments - 1) x its header length. A drop (loss, queue, cut) removes a whole
super-packet: loss is burstier than per-segment loss at the same byte fraction.

The process dies with its parent thread (``PR_SET_PDEATHSIG``) and on EOF of stdin.
One thread, one epoll loop, one heap of due packets.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import gc
import json
import os
import select
import signal
import struct
import sys
import time
from typing import Any

from xmig.errors import ConfigError, NetemError, NetemPermissionError
from xmig.netem.nsutil import set_pdeathsig
from xmig.netem.scheduler import Direction, Scheduler
from xmig.netem.spec import LinkSpec

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04

VNET_HDR = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_off
VNET_HDR_LEN = VNET_HDR.size
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

#: Bounds of the wake-up lead: the timer is armed this much before a packet is due (the
#: lead follows the measured wake-up latency), and packets due within it are released.
MIN_LEAD_S = 0.00002
MAX_LEAD_S = 0.001
CLOCK_MONOTONIC = 1
TFD_TIMER_ABSTIME = 1
PR_SET_TIMERSLACK = 29
#: Most packets read from one TUN before looking at the other and at due packets.
READ_BATCH = 64
MAX_FRAME = 65536 + VNET_HDR_LEN


def wire_length(frame: bytes) -> int:
    """Bytes ``frame`` (vnet header + IP packet) would put on a 1500-byte-MTU wire as IP packets.

    A GSO super-packet of n segments counts its IP length plus (n - 1) x its IP+L4 header length.
    """
    ip_len = len(frame) - VNET_HDR_LEN
    if ip_len <= 0:
        return 0
    gso_type: int = frame[1] & ~GSO_ECN
    gso_size = int.from_bytes(frame[4:6], sys.byteorder)  # the legacy header is host-endian
    if gso_type == GSO_NONE or gso_size == 0:
        return ip_len
    first = frame[VNET_HDR_LEN]
    l3 = (first & 0x0F) * 4 if first >> 4 == 4 else 40
    if gso_type in (GSO_TCPV4, GSO_TCPV6):
        offset = VNET_HDR_LEN + l3 + 12
        if offset >= len(frame):
            return ip_len
        l4 = (frame[offset] >> 4) * 4
    else:
        l4 = 8
    header = l3 + l4
    payload = ip_len - header
    if payload <= gso_size:
        return ip_len
    segments = -(-payload // gso_size)
    return ip_len + (segments - 1) * header


def open_tun(name: str) -> int:
    """Create TUN device ``name`` in the calling thread's namespace; return its non-blocking fd."""
    fd = -1
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        ifreq = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifreq)
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    except OSError as err:
        if fd >= 0:
            os.close(fd)
        cls = NetemPermissionError if err.errno in (errno.EPERM, errno.EACCES) else NetemError
        raise cls(f"cannot open TUN device {name}: {err}") from err
    return fd


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


class Timer:
    """A one-shot CLOCK_MONOTONIC timerfd (epoll alone sleeps in whole milliseconds)."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.timerfd_create(CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise NetemError(f"timerfd_create: {os.strerror(ctypes.get_errno())}")
        self.fd: int = fd
        self.armed: float | None = None
        self._spec = _Itimerspec()
        # wake-ups within microseconds of the deadline, not the default 50 us slack
        self._libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)

    def arm(self, deadline: float | None) -> None:
        """Fire at ``deadline`` (time.monotonic() seconds), or never if None."""
        if deadline == self.armed:
            return
        self.armed = deadline
        value = self._spec.it_value
        if deadline is None:
            value.tv_sec = value.tv_nsec = 0
        else:
            ns = max(1, int(deadline * 1e9))
            value.tv_sec, value.tv_nsec = divmod(ns, 1_000_000_000)
        if self._libc.timerfd_settime(self.fd, TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None):
            raise NetemError(f"timerfd_settime: {os.strerror(ctypes.get_errno())}")

    def clear(self) -> None:
        """Consume an expiry so that epoll stops reporting the timer."""
        self.armed = None
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 8)


class Emulator:
    """The event loop: reads both TUNs and the control pipe, writes packets when due."""

    def __init__(self, spec: LinkSpec, tun_fwd: int, tun_rev: int, ctl_in: int, ctl_out: int):
        self.sched: Scheduler[bytes] = Scheduler(spec)
        self.tuns = (tun_fwd, tun_rev)
        self.out = {Direction.FWD: tun_rev, Direction.REV: tun_fwd}
        self.ctl_in = ctl_in
        self.ctl_out = ctl_out
        self.ctl_buf = b""
        self.write_errors = 0
        self.lead = MIN_LEAD_S
        self.started = time.monotonic()
        self.running = True

    def reply(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
        while data:
            try:
                data = data[os.write(self.ctl_out, data) :]
            except BlockingIOError:
                select.select([], [self.ctl_out], [], 1.0)

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        now = time.monotonic()
        if op == "set":
            self.sched.set(LinkSpec.from_dict(request["spec"]))
            return {}
        if op == "cut":
            return {"discarded": self.sched.cut(now)}
        if op == "restore":
            self.sched.restore()
            return {}
        if op == "stats":
            times = os.times()
            return {
                "stats": {
                    **self.sched.stats(),
                    "write_errors": self.write_errors,
                    "wake_lead_s": self.lead,
                    "cpu_s": times.user + times.system,
                    "cpu_user_s": times.user,
                    "uptime_s": now - self.started,
                }
            }
        if op == "ping":
            return {}
        raise ConfigError(f"unknown emulator request {op!r}")

    def on_control(self) -> None:
        try:
            chunk = os.read(self.ctl_in, 65536)
        except BlockingIOError:
            return
        if not chunk:
            self.running = False
            return
        self.ctl_buf += chunk
        *lines, self.ctl_buf = self.ctl_buf.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            rid: Any = None
            try:
                request = json.loads(line)
                rid = request.get("id")
                answer = {"id": rid, "ok": True, **self.handle(request)}
            except (ValueError, KeyError, TypeError, AttributeError, ConfigError) as err:
                answer = {"id": rid, "ok": False, "error": f"{type(err).__name__}: {err}"}
            self.reply(answer)

    def on_tun(self, fd: int) -> None:
        direction = Direction.FWD if fd == self.tuns[0] else Direction.REV
        offer = self.sched.offer
        now = time.monotonic()
        for _ in range(READ_BATCH):
            try:
                frame = os.read(fd, MAX_FRAME)
            except BlockingIOError:
                return
            except OSError as err:
                if err.errno in (errno.EINTR, errno.EAGAIN):
                    return
                raise
            offer(direction, frame, wire_length(frame), now)

    def on_timer(self, timer: Timer, alone: bool) -> None:
        if alone and timer.armed is not None:  # a clean sample of the wake-up latency
            late = time.monotonic() - timer.armed
            self.lead = min(MAX_LEAD_S, max(MIN_LEAD_S, 0.9 * self.lead + 0.1 * late))
        timer.clear()

    def flush_due(self) -> None:
        for direction, frame in self.sched.pop_due(time.monotonic() + self.lead):
            try:
                os.write(self.out[direction], frame)
            except OSError:
                self.write_errors += 1

    def run(self) -> None:
        timer = Timer()
        ep = select.epoll()
        ep.register(self.ctl_in, select.EPOLLIN | select.EPOLLHUP)
        ep.register(timer.fd, select.EPOLLIN)
        for fd in self.tuns:
            ep.register(fd, select.EPOLLIN)
        while self.running:
            due = self.sched.next_due()
            timer.arm(None if due is None else due - self.lead)
            events = ep.poll()
            for fd, _ in events:
                if fd == timer.fd:
                    self.on_timer(timer, len(events) == 1)
                elif fd == self.ctl_in:
                    self.on_control()
                else:
                    self.on_tun(fd)
            self.flush_due()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xmig.netem.emulator")
    parser.add_argument("--parent", type=int, required=True, help="pid of the parent process")
    parser.add_argument("--spec", required=True, help="initial LinkSpec as JSON")
    parser.add_argument("--tun-fwd", default="tun-fwd")
    parser.add_argument("--tun-rev", default="tun-rev")
    args = parser.parse_args(argv)
    set_pdeathsig(signal.SIGKILL)
    if os.getppid() != args.parent:
        return 1  # the parent died before the death signal was armed
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal ^C is for the parent to handle
    spec = LinkSpec.from_dict(json.loads(args.spec))
    tun_fwd = open_tun(args.tun_fwd)
    tun_rev = open_tun(args.tun_rev)
    ctl_in, ctl_out = sys.stdin.fileno(), sys.stdout.fileno()
    os.set_blocking(ctl_in, False)
    emulator = Emulator(spec, tun_fwd, tun_rev, ctl_in, ctl_out)
    emulator.reply({"event": "ready", "pid": os.getpid()})
    gc.disable()  # the loop makes no reference cycles; avoid collector pauses
    emulator.run()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except NetemError as err:
        print(json.dumps({"event": "error", "type": type(err).__name__, "error": str(err)}))
        sys.exit(2)
