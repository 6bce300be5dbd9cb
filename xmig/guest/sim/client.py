"""Clients of the guest's UDP service (:mod:`xmig.guest.sim.protocol`).

:class:`SimClient` PUTs, GETs and PINGs, retrying until a deadline (a datagram sent while
the guest is paused or moving gets no answer; the retry reaches the destination).
:class:`DowntimeProbe` sends a request every few milliseconds from a thread (or, with
``own_process``, from a process of its own, so a busy caller cannot delay it) and reports the
longest gap between answers: the client-observed downtime. In PUT mode it also keeps every
key the guest acknowledged, to read them all back after a migration (keys cycle through
``key_space`` names so a long run does not fill the guest's table; each value is the request
number, so a later PUT of the same key may legitimately have overwritten an acknowledged one).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from xmig.errors import GuestError
from xmig.guest.sim.protocol import (
    BAD_REQUEST,
    OK,
    OP_GET,
    OP_PING,
    OP_PUT,
    TABLE_FULL,
    ProtocolViolation,
    Reply,
    Request,
)


def _socket_for(addr: tuple[str, int]) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    return sock


def _receive(sock: socket.socket) -> Reply | None:
    try:
        data, _ = sock.recvfrom(2048)
        return Reply.decode(data)
    except (BlockingIOError, ProtocolViolation):
        return None
    except OSError:  # an ICMP error surfaced on the socket: no answer
        return None


class SimClient:
    """Blocking requests to one guest's service. Every call retries (each attempt waits
    ``attempt_s``) until ``deadline_s``, then raises GuestError."""

    def __init__(self, addr: tuple[str, int], *, attempt_s: float = 0.05) -> None:
        self.addr = addr
        self.attempt_s = attempt_s
        self._sock = _socket_for(addr)
        self._rid = (os.getpid() << 16) & 0xFFFFFFFF

    def _call(self, request: Request, deadline_s: float) -> Reply:
        data = request.encode()
        deadline = time.monotonic() + deadline_s
        while True:
            with contextlib.suppress(OSError):
                self._sock.sendto(data, self.addr)
            attempt_end = min(deadline, time.monotonic() + self.attempt_s)
            while (left := attempt_end - time.monotonic()) > 0:
                if not select.select([self._sock], [], [], left)[0]:
                    break
                reply = _receive(self._sock)
                if reply is not None and reply.rid == request.rid:
                    return reply
            if time.monotonic() >= deadline:
                raise GuestError(f"no answer from the guest at {self.addr} in {deadline_s} s")

    def _next_rid(self) -> int:
        self._rid = (self._rid + 1) & 0xFFFFFFFF
        return self._rid

    def ping(self, *, deadline_s: float = 5.0) -> int:
        """The guest's progress counter."""
        return self._call(Request(OP_PING, self._next_rid()), deadline_s).progress

    def put(self, key: bytes, value: bytes, *, deadline_s: float = 5.0) -> None:
        reply = self._call(Request(OP_PUT, self._next_rid(), key, value), deadline_s)
        if reply.status == BAD_REQUEST:
            raise ValueError(f"key of {len(key)} or value of {len(value)} bytes refused")
        if reply.status == TABLE_FULL:
            raise GuestError("the guest's table is full")

    def get(self, key: bytes, *, deadline_s: float = 5.0) -> bytes | None:
        reply = self._call(Request(OP_GET, self._next_rid(), key), deadline_s)
        return reply.payload if reply.status == OK else None

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> SimClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


GAP_RECORDED_S = 0.01  #: gaps this long or longer are listed (ProbeReport.gaps)
MAX_GAPS = 10_000


@dataclass
class ProbeReport:
    """What a :class:`DowntimeProbe` saw."""

    sent: int = 0
    answered: int = 0
    max_gap_s: float = 0.0
    """Longest time without an answer (client-observed downtime), counting the tail up to
    :meth:`DowntimeProbe.stop`."""
    gap_start_mono: float = 0.0
    gap_end_mono: float = 0.0
    duration_s: float = 0.0
    gaps: list[tuple[float, float]] = field(default_factory=list)
    """Every gap of at least ``GAP_RECORDED_S`` (monotonic start, end), the first
    ``MAX_GAPS`` of them."""
    acknowledged: dict[bytes, int] = field(default_factory=dict)
    """PUT mode: every key the guest acknowledged, with the newest request number (its value)
    acknowledged for it."""

    def max_gap_outside(self, start: float, end: float) -> float:
        """The longest gap that does not overlap ``[start, end]`` (e.g. the blackout): what
        the migration cost the client outside it; 0.0 for none of ``GAP_RECORDED_S``."""
        return max((b - a for a, b in self.gaps if b < start or a > end), default=0.0)

    def _gap(self, last_answer: float, now: float) -> None:
        if now - last_answer > self.max_gap_s:
            self.max_gap_s = now - last_answer
            self.gap_start_mono, self.gap_end_mono = last_answer, now
        if now - last_answer >= GAP_RECORDED_S and len(self.gaps) < MAX_GAPS:
            self.gaps.append((last_answer, now))

    def missing(self, client: SimClient, *, deadline_s: float = 5.0) -> list[bytes]:
        """Acknowledged keys for which the guest (now) returns no value, or one older than
        the newest it acknowledged: lost acknowledged writes."""
        lost = []
        for key, newest in self.acknowledged.items():
            value = client.get(key, deadline_s=deadline_s)
            if value is None or not value.isdigit() or int(value) < newest:
                lost.append(key)
        return lost


class DowntimeProbe:
    """Sends a PING (or, with ``put_keys``, a PUT) every ``interval_s`` from a thread, and
    measures the longest gap between answers."""

    def __init__(
        self,
        addr: tuple[str, int],
        *,
        interval_s: float = 0.002,
        put_keys: bool = False,
        key_prefix: bytes = b"probe-",
        key_space: int = 1024,
        own_process: bool = False,
    ) -> None:
        self.addr = addr
        self.own_process = own_process
        self._child: Any = None  # (process, pipe end, stop event) when own_process
        self.interval_s = interval_s
        self.put_keys = put_keys
        self.key_prefix = key_prefix
        self.key_space = key_space
        self.report = ProbeReport()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: dict[int, bytes] = {}

    def start(self) -> DowntimeProbe:
        if self.own_process:  # a busy caller (the GIL, its event loop) cannot delay it
            ctx = multiprocessing.get_context("spawn")
            parent, child = ctx.Pipe()
            stop = ctx.Event()
            process = ctx.Process(target=_probe_process, name="xmig-downtime-probe", args=(
                self.addr, self.interval_s, self.put_keys, self.key_prefix, self.key_space,
                child, stop), daemon=True)
            process.start()
            child.close()
            self._child = (process, parent, stop)
            if not parent.poll(PROBE_START_S):
                raise GuestError("the downtime probe process did not start")
            parent.recv()  # it runs
            return self
        self._thread = threading.Thread(target=self._run, name="xmig-downtime-probe", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> ProbeReport:
        if self._child is not None:
            process, parent, stop = self._child
            self._child = None
            stop.set()
            if parent.poll(PROBE_START_S):
                self.report = parent.recv()
            process.join(PROBE_START_S)
            parent.close()
            return self.report
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.report

    def _run(self) -> None:
        report = self.report
        sock = _socket_for(self.addr)
        start = time.monotonic()
        last_answer = start
        next_send = start
        rid = 0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_send:
                    rid = (rid + 1) & 0xFFFFFFFF
                    if self.put_keys:
                        key = b"%s%d" % (self.key_prefix, rid % self.key_space)
                        request = Request(OP_PUT, rid, key, b"%d" % rid)
                        self._pending[rid] = key
                    else:
                        request = Request(OP_PING, rid)
                    with contextlib.suppress(OSError):
                        sock.sendto(request.encode(), self.addr)
                    report.sent += 1
                    next_send = max(next_send + self.interval_s, now)
                    continue
                if not select.select([sock], [], [], next_send - now)[0]:
                    continue
                while (reply := _receive(sock)) is not None:
                    now = time.monotonic()
                    report.answered += 1
                    report._gap(last_answer, now)
                    last_answer = now
                    put = self._pending.pop(reply.rid, None)
                    if put is not None and reply.status == OK:
                        report.acknowledged[put] = max(reply.rid,
                                                       report.acknowledged.get(put, 0))
        finally:
            sock.close()
            end = time.monotonic()
            report.duration_s = end - start
            report._gap(last_answer, end)

    def __enter__(self) -> DowntimeProbe:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


PROBE_START_S = 30.0  #: a probe process answers this fast at the latest (start, report)


def _probe_process(addr: tuple[str, int], interval_s: float, put_keys: bool,
                   key_prefix: bytes, key_space: int, conn: Any, stop: Any) -> None:
    """A :class:`DowntimeProbe` in a process of its own; its report goes back on ``conn``."""
    probe = DowntimeProbe(addr, interval_s=interval_s, put_keys=put_keys,
                          key_prefix=key_prefix, key_space=key_space).start()
    conn.send("started")
    stop.wait()
    conn.send(probe.stop())
    conn.close()
