"""The memory stream tunnel: QEMU's own migration stream carried on an xmig session.

::

    source QEMU --migrate unix:S--> SourceTunnel ==MEMORY==> DestTunnel --> unix:D <-- dest QEMU
               <--return path----              <==DEVICE_STATE==        <--return path--

- :class:`SourceTunnel` listens on a unix socket (``uri`` for QMP ``migrate``); the source
  QEMU connects to it, and every byte it writes is sent on :data:`~Channel.MEMORY` in chunks of
  up to :data:`CHUNK` bytes. Bytes of a return path (capability ``return-path``: the
  destination's acknowledgements, ``SHUT`` at the end) would arrive on
  :data:`~Channel.DEVICE_STATE` and be written back into QEMU's socket; xmig's source QEMU
  runs without one (:meth:`_Tunnel.sever` says why), so none come.
- :class:`DestTunnel` connects to the destination QEMU's incoming socket (QMP
  ``migrate-incoming`` with ``unix:D`` on a QEMU started ``-incoming defer``), writes the
  chunks into it and sends what QEMU writes back on :data:`~Channel.DEVICE_STATE`.
- An empty message is the end of a direction (that side's QEMU closed its end).
- Both directions are metered (:class:`Meter`: bytes, average and recent rate).
- :class:`BandwidthGovernor` sets the source QEMU's ``max-bandwidth`` from the session's
  delivery-rate estimate when the link limits the flow (a backlog in the session), and
  raises it while QEMU uses all of it, so QEMU's own convergence logic (its bandwidth and downtime
  estimates) sees the rate the link really delivers instead of how fast a local socket
  swallows bytes (measured: limited by the carrier only, QEMU's final burst queued in it and
  it reported 307 ms of downtime; limited by ``max-bandwidth``, 20 ms).

A link cut is absorbed by the session's resume: the sockets to QEMU stay open, QEMU only sees
a pause in the flow. Each message is one frame of the session, so the memory channel's
window bounds how much of QEMU's stream is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from xmig.errors import QemuError, XmigError
from xmig.private import unix_listener
from xmig.transport import Channel, TransportSession

KiB = 1 << 10
MiB = 1 << 20
CHUNK = 256 * KiB
FORWARD = Channel.MEMORY
BACK = Channel.DEVICE_STATE


@dataclass
class Meter:
    """Bytes moved in one direction and their rates (``time.monotonic()`` clock)."""

    bytes: int = 0
    chunks: int = 0
    started: float = 0.0
    last: float = 0.0
    window_s: float = 1.0
    _samples: deque[tuple[float, int]] = field(default_factory=deque, repr=False)

    def add(self, nbytes: int, now: float) -> None:
        if not self.started:
            self.started = now
            self._samples.append((now, 0))
        self.bytes += nbytes
        self.chunks += 1
        self.last = now
        self._samples.append((now, self.bytes))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()

    def rate(self, now: float | None = None) -> float:
        """Bytes per second over the last ``window_s`` seconds (0 before two samples)."""
        if len(self._samples) < 2:
            return 0.0
        now = time.monotonic() if now is None else now
        t0, b0 = self._samples[0]
        return (self.bytes - b0) / max(now - t0, 1e-3)

    def average(self) -> float:
        """Bytes per second from the first byte to the last."""
        span = self.last - self.started
        return self.bytes / span if span > 0 else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {"bytes": self.bytes, "chunks": self.chunks,
                "rate_Bps": round(self.rate(), 1), "average_Bps": round(self.average(), 1)}


class _Tunnel:
    """What both ends share: two pumps between a QEMU socket and the session."""

    def __init__(self, session: TransportSession, *, out: Channel, into: Channel,
                 chunk: int = CHUNK, forward_eof: bool = True) -> None:
        if chunk <= 0:
            raise ValueError(f"chunk size {chunk}")
        self.session = session
        self.forward_eof = forward_eof  #: the peer's end closing closes ours to QEMU
        self.out_channel = out  #: what QEMU writes goes here
        self.in_channel = into  #: what arrives here is written to QEMU
        self.chunk = chunk
        self.sent = Meter()  #: QEMU -> session
        self.received = Meter()  #: session -> QEMU
        self.sent_eof = asyncio.Event()  #: QEMU closed its end; the peer was told
        self.received_eof = asyncio.Event()  #: the peer's QEMU closed its end
        self.error: BaseException | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._failed = asyncio.Event()
        self._moved = asyncio.Event()  #: set at each chunk written into QEMU, and at EOF
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None

    def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer, self._reader = writer, reader
        self._tasks = [asyncio.create_task(self._pump_out(reader)),
                       asyncio.create_task(self._pump_in(writer))]
        for task in self._tasks:
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self.error is None:
            self.error = exc
            self._failed.set()

    async def _pump_out(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                data = await reader.read(self.chunk)
            except OSError as err:  # QEMU reset the connection (e.g. migrate_cancel)
                raise QemuError(f"reading QEMU's migration stream: {err}") from err
            await self.session.send(self.out_channel, data)
            if not data:
                self.sent_eof.set()
                return
            self.sent.add(len(data), time.monotonic())

    async def _pump_in(self, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await self.session.recv(self.in_channel)
            if not data:
                self.received_eof.set()
                self._moved.set()
                if self.forward_eof:
                    with contextlib.suppress(OSError):
                        if writer.can_write_eof():
                            writer.write_eof()
                return
            writer.write(data)
            try:
                await writer.drain()
            except OSError as err:
                raise QemuError(f"writing QEMU's migration stream: {err}") from err
            self.received.add(len(data), time.monotonic())
            self._moved.set()

    async def sever(self) -> None:
        """Stop carrying and shut our end of QEMU's socket down both ways, keeping it open
        until :meth:`close`: QEMU's migration thread, blocked writing into a stalled tunnel
        or not, gets EPIPE at once and QEMU fails the migration on its own network-failure
        path (the source guest runs on). The socket stays open so that nothing else changes
        under QEMU until it reported the end; close it only then.

        Why not close (or reset) it at once: a QEMU 7.2 with a return-path thread reading
        this socket ends that thread on the EOF/reset, and the thread closes the socket it
        shares with the still running migration thread (``source_return_path_thread`` ->
        ``migration_release_from_dst_file`` -> ``qemu_fclose(rp)``); the migration thread
        then writes to a closed, soon reused descriptor (``Unable to write to socket: Bad
        file descriptor``). The source QEMU therefore runs without a return path
        (:func:`~xmig.orchestrator.run.migrate_qemu`); this order keeps QEMU out of
        its teardown races either way."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        self._tasks = []
        if self._writer is not None:
            sock = self._writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    async def wait_sent(self) -> None:
        """Until QEMU's end closed (and the peer was told); typed error if a pump failed."""
        await self._until(self.sent_eof)

    async def wait_received_bytes(self, nbytes: int) -> None:
        """Until ``nbytes`` of the peer's stream were written into our QEMU."""
        while self.received.bytes < nbytes:
            self._raise_if_failed()
            if self.received_eof.is_set():
                raise QemuError(f"the stream ended at {self.received.bytes} bytes, "
                                f"{nbytes} were sent")
            self._moved.clear()
            await self._until(self._moved)

    async def _until(self, event: asyncio.Event) -> None:
        self._raise_if_failed()
        done_w = asyncio.ensure_future(event.wait())
        fail_w = asyncio.ensure_future(self._failed.wait())
        try:
            await asyncio.wait([done_w, fail_w], return_when=asyncio.FIRST_COMPLETED)
        finally:
            done_w.cancel()
            fail_w.cancel()
        if not event.is_set():
            self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        err = self.error
        if err is None:
            return
        if isinstance(err, XmigError):
            raise err
        raise QemuError(f"migration stream tunnel failed: {err!r}") from err

    def stats(self) -> dict[str, object]:
        return {"sent": self.sent.as_dict(), "received": self.received.as_dict(),
                "sent_eof": self.sent_eof.is_set(), "received_eof": self.received_eof.is_set()}

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self._writer.wait_closed()


class SourceTunnel(_Tunnel):
    """The source agent's end: a unix socket the source QEMU migrates into (``uri``)."""

    def __init__(self, session: TransportSession, path: str | os.PathLike[str], *,
                 chunk: int = CHUNK) -> None:
        # the peer's end of the return path is not passed on to the source QEMU: a QEMU
        # reading one ends its return-path thread there, which closes the socket under the
        # migration thread (see sever); xmig ends the migration itself when the
        # destination fails
        super().__init__(session, out=FORWARD, into=BACK, chunk=chunk, forward_eof=False)
        self.path = Path(path).resolve()
        if len(str(self.path)) > 100:
            raise QemuError(f"socket path {self.path} is too long for sun_path")
        self._server: asyncio.Server | None = None
        self.connected = asyncio.Event()

    @property
    def uri(self) -> str:
        """For QMP ``migrate``."""
        return f"unix:{self.path}"

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(
            self._accept, sock=unix_listener(self.path), limit=2 * self.chunk)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connected.is_set():  # one migration stream per tunnel
            writer.close()
            return
        self.connected.set()
        self._run(reader, writer)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        await super().close()
        self.path.unlink(missing_ok=True)


class DestTunnel(_Tunnel):
    """The destination agent's end: connects to the destination QEMU's incoming socket."""

    def __init__(self, session: TransportSession, path: str | os.PathLike[str], *,
                 chunk: int = CHUNK) -> None:
        super().__init__(session, out=BACK, into=FORWARD, chunk=chunk)
        self.path = Path(path).resolve()
        if len(str(self.path)) > 100:
            raise QemuError(f"socket path {self.path} is too long for sun_path")

    @property
    def uri(self) -> str:
        """For QMP ``migrate-incoming``."""
        return f"unix:{self.path}"

    async def start(self, timeout: float = 5.0) -> None:
        """Connect to QEMU's incoming socket (call after ``migrate-incoming``)."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(
                    str(self.path), limit=2 * self.chunk)
        except (OSError, TimeoutError) as err:
            raise QemuError(f"cannot reach QEMU's incoming socket {self.path}: {err}") from err
        self._run(reader, writer)


class _Qmp(Protocol):
    async def execute(self, command: str, arguments: dict[str, object] | None = None
                      ) -> object: ...


class BandwidthGovernor:
    """Keeps the source QEMU's ``max-bandwidth`` at the rate the link delivers.

    Every ``period_s``, from the session's delivery-rate estimate ``rate`` (with ``sent``,
    QEMU's bytes into the tunnel: once the stream has flowed for one window of it, or for
    a period and two round trips; until the window is full, at least the rate acknowledged
    over the last period),
    the session's minimum RTT (the path's own: the smoothed RTT grows with the very queue
    to be seen; measured at 100 Mbit × 50 ms with ``rate × srtt``: srtt 0.35-0.45 s, a
    standing queue of ~4 MB, and the last pass waited 1.3 s behind it) and the stream's
    backlog in the session (queued and in flight on the memory channel), against one
    bandwidth-delay product ``bdp = rate × min_rtt``:

    - backlog over ``2 × bdp + slack``: bytes queue in the carrier, where QEMU cannot see
      them (its downtime estimate would be short by their drain time): the link limits the
      flow and ``rate`` is its rate: ``rate × drain_gain``;
    - backlog over ``bdp`` and over what the cap itself keeps in flight (a round trip of
      it), ``+ slack / 4``: the link limits: ``rate``;
    - otherwise QEMU, not the link, limits the flow. If QEMU used the cap over the last
      period (``sent`` reached ``use`` × the cap), the cap is what holds it back: raised
      ×``startup_gain`` until the link has limited the flow once, ×``probe_gain`` after
      (finding a faster link). Else ``rate × probe_gain``, but never lower than the cap:
      a rate under the cap says how fast QEMU had pages to send, not how fast the link is.

    ``initial_Bps`` until the rate is known (None: QEMU's default). Measured at 1 Gbit ×
    100 ms with the cap following ``rate × probe_gain`` from QEMU's first bytes: it started
    at the 1 MiB/s floor (the first acks' rate) and took 10 s to reach 26 MB/s, QEMU's
    pre-copy running at a fraction of the link all along. Never below ``floor_Bps``;
    ``share`` scales the rate (the memory's part when a disk mirror shares it)."""

    def __init__(self, qmp: _Qmp, session: TransportSession, *, period_s: float = 0.25,
                 initial_Bps: float | None = None, floor_Bps: float = 1 * MiB,
                 probe_gain: float = 1.25, drain_gain: float = 0.8, startup_gain: float = 2.0,
                 use: float = 0.8, slack: int = 1 * MiB,
                 share: Callable[[], float] = lambda: 1.0,
                 sent: Callable[[], int] | None = None, rate_window_s: float = 1.0) -> None:
        self.qmp = qmp
        self.session = session
        self.period_s = period_s
        self.initial_Bps = initial_Bps
        self.floor_Bps = floor_Bps
        self.probe_gain = probe_gain
        self.drain_gain = drain_gain
        self.startup_gain = startup_gain
        self.use = use
        self.slack = slack
        self.share = share
        self.sent = sent
        self.rate_window_s = rate_window_s  #: the session's delivery-rate window
        self.current: int | None = None
        self.link_limited = False  #: the link has limited the flow at least once
        self.history: list[tuple[float, int]] = []
        self._mark: tuple[float, int] | None = None
        self._flowing: float | None = None  #: when QEMU's first bytes went into the tunnel
        self._acked: tuple[float, int] | None = None

    def backlog(self) -> int:
        """Bytes of the stream queued or in flight in the session."""
        chan = self.session.session.send_channels.get(int(FORWARD))
        return 0 if chan is None else chan.pending_bytes + chan.inflight_bytes

    def _sending(self, now: float, fallback: float) -> float:
        """QEMU's rate into the tunnel since the last call (``fallback`` without ``sent``)."""
        if self.sent is None:
            return fallback
        nbytes, mark = self.sent(), self._mark
        self._mark = (now, nbytes)
        if mark is None or now <= mark[0]:
            return 0.0
        return (nbytes - mark[1]) / (now - mark[0])

    def _acked_rate(self, now: float, stats: dict[str, object]) -> float | None:
        """Bytes the peer acknowledged per second since the last call (None: unknown)."""
        acked = stats.get("acked_bytes")
        if not isinstance(acked, int):
            return None
        mark, self._acked = self._acked, (now, acked)
        if mark is None or now - mark[0] < self.period_s / 2:
            return None
        return (acked - mark[1]) / (now - mark[0])

    def target(self) -> int | None:
        now = time.monotonic()
        stats = self.session.stats()
        rate = float(stats.get("delivery_rate_Bps") or 0.0)
        srtt = float(stats.get("srtt_s") or 0.0)
        sending = self._sending(now, rate)
        if self._flowing is None and sending > 0:
            self._flowing = now
        backlog = self.backlog()
        current = self.current or 0
        # the delivery rate is a window's average: only once QEMU's stream has flowed for
        # one window (and a round trip) does it measure the stream, not its first acks;
        # the acks of the last period say sooner (and, the window lagging, higher)
        recent = self._acked_rate(now, stats)
        flowed = None if self._flowing is None else now - self._flowing
        window_full = flowed is not None and flowed >= self.rate_window_s + srtt
        mature = rate > 0 and (self.sent is None or window_full or (
            recent is not None and flowed is not None and flowed >= 2 * srtt + self.period_s))
        if mature and not window_full and recent is not None:
            # only while the window still holds the stream's start: a period's acks are
            # noisy (measured at 100 Mbit: spikes of 1.3 x the link kept the cap over it
            # and a standing queue of 6-8 MB ahead of QEMU's last pass)
            rate = max(rate, recent)
        # the path's own round trip: srtt grows with the queue the governor must see
        rtt = float(stats.get("min_rtt_s") or srtt)
        if mature:
            bdp = rate * rtt
            if backlog > 2 * bdp + self.slack:  # a queue: the link limits the flow
                self.link_limited = True
                return int(max(self.floor_Bps, rate * self.drain_gain * self.share()))
            # over what the cap itself keeps in flight (a round trip of it)
            if backlog >= max(bdp, current * rtt) + self.slack / 4:
                self.link_limited = True
                return int(max(self.floor_Bps, rate * self.share()))
        elif self.current is None:
            return None if self.initial_Bps is None else int(self.initial_Bps)
        # QEMU, not the link, limits the flow
        if self.current is not None and self.sent is not None and (
                sending >= self.use * self.current):  # ... because of the cap
            gain = self.probe_gain if self.link_limited else self.startup_gain
            return int(self.current * gain)
        if not mature:
            return self.current
        # a rate under the cap says how fast QEMU had pages to send: it never lowers the cap
        return int(max(current, self.floor_Bps, rate * self.probe_gain * self.share()))

    async def apply(self) -> None:
        target = self.target()
        if target is None or target == self.current:
            return
        await self.qmp.execute("migrate-set-parameters", {"max-bandwidth": target})
        self.current = target
        self.history.append((time.monotonic(), target))

    async def run(self, on_period: Callable[[], None] = lambda: None) -> None:
        """Until cancelled (a QMP failure ends it with QemuError); ``on_period`` is called
        after each adjustment (a progress report)."""
        while True:
            await self.apply()
            on_period()
            await asyncio.sleep(self.period_s)  # a control period, not a wait for a condition


__all__ = ["CHUNK", "BandwidthGovernor", "DestTunnel", "Meter", "SourceTunnel"]
