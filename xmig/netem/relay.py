"""The approximate link for machines without root: an asyncio TCP relay on loopback.

:meth:`RelayLink.dst_endpoint` starts a listener on 127.0.0.1 that forwards each accepted
connection to ``127.0.0.1:port``; the bytes of each direction pass a virtual transmitter
shared by all connections (rate charged on payload x 1500/1448, the wire bytes of full-size
TCP segments) and are held for the one-way delay. A direction's queue is bounded like the
faithful link's; the relay stops reading (TCP flow control pushes back on the sender) rather
than dropping. Loss is not emulated (a byte stream cannot lose bytes).

What it gets wrong, and why :attr:`RelayLink.approximate` is True: each endpoint talks TCP over
loopback, so senders see a loopback RTT: slow start and loss recovery are not those of the
emulated link, fresh transfers finish early. Connection setup does not pay the RTT.

Cut: the relay **stops forwarding**, it does not drop connections. Bytes already in flight and
bytes sent during the cut are held (senders stall once their buffers fill) and are delivered
at restore; connections opened during the cut are accepted on loopback but are connected to
their destination, and carry bytes, only after restore.

Everything runs on an event loop in a daemon thread, so the link keeps working while the
caller blocks (sync code) or runs its own loop (async code).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from xmig.errors import NetemError
from xmig.netem.spec import LinkSpec

T = TypeVar("T")

CHUNK = 64 * 1024
WIRE_FACTOR = 1500 / 1448
LOOPBACK = "127.0.0.1"


def terminate_children(children: list[subprocess.Popen[bytes]], grace_s: float = 3.0) -> None:
    """SIGTERM the children still running, SIGKILL those that outlive ``grace_s``; reap all."""
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    children.clear()


class _Lane:
    """One direction: its transmitter clock and counters."""

    def __init__(self) -> None:
        self.tx_free = 0.0
        self.bytes = 0
        self.chunks = 0


class RelayLink:
    """Rate- and delay-shaping TCP relays on loopback. See the module docstring."""

    approximate = True
    src_addr = LOOPBACK
    dst_addr = LOOPBACK

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        self._lanes = {"fwd": _Lane(), "rev": _Lane()}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: dict[int, asyncio.Server] = {}
        self._endpoints: dict[int, tuple[str, int]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._restored: asyncio.Event | None = None
        self._connections = 0
        self._lock = threading.Lock()
        self._children: list[subprocess.Popen[bytes]] = []

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the relay's event loop thread."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            self._restored = asyncio.Event()
            self._restored.set()
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="netem-relay", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise NetemError("the relay's event loop did not start")

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        if self._loop is None or not self._loop.is_running():
            coro.close()
            raise NetemError("the relay is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def close(self) -> None:
        """Terminate programs started by :meth:`popen`, close listeners and connections."""
        terminate_children(self._children)
        if self._loop is None:
            return
        if self._loop.is_running():
            with contextlib.suppress(Exception):
                self._call(self._shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._loop.close()
        self._loop = None

    async def _shutdown(self) -> None:
        for server in self._servers.values():
            server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._servers.clear()

    # -- hosts -------------------------------------------------------------------------

    def socket(self, side: str, family: int, type: int) -> socket.socket:
        if side not in ("src", "dst"):
            raise NetemError(f"side must be 'src' or 'dst', not {side!r}")
        return socket.socket(family, type)

    def dst_endpoint(self, port: int) -> tuple[str, int]:
        with self._lock:
            if port not in self._endpoints:
                self._endpoints[port] = self._call(self._listen(port))
            return self._endpoints[port]

    def popen(self, side: str, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        if side not in ("src", "dst"):
            raise NetemError(f"side must be 'src' or 'dst', not {side!r}")
        proc: subprocess.Popen[bytes] = subprocess.Popen(argv, **kw)
        self._children.append(proc)
        return proc

    # -- link control ------------------------------------------------------------------

    def set(self, spec: LinkSpec) -> None:
        async def apply() -> None:
            self.spec = spec

        self._call(apply())

    def cut(self) -> None:
        async def apply() -> None:
            assert self._restored is not None
            self._restored.clear()

        self._call(apply())

    def restore(self) -> None:
        async def apply() -> None:
            assert self._restored is not None
            self._restored.set()

        self._call(apply())

    def stats(self) -> dict[str, Any]:
        async def collect() -> dict[str, Any]:
            assert self._restored is not None
            return {
                "mode": "relay",
                "cut": not self._restored.is_set(),
                "connections": self._connections,
                "spec": self.spec.to_dict(),
                **{
                    name: {"forwarded_bytes": lane.bytes, "forwarded_chunks": lane.chunks}
                    for name, lane in self._lanes.items()
                },
            }

        return self._call(collect())

    # -- data path (on the loop) -------------------------------------------------------

    async def _listen(self, port: int) -> tuple[str, int]:
        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.get_running_loop().create_task(self._serve(reader, writer, port))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        server = await asyncio.start_server(accepted, LOOPBACK, 0)
        self._servers[port] = server
        return (LOOPBACK, server.sockets[0].getsockname()[1])

    async def _serve(
        self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter, port: int
    ) -> None:
        self._writers.add(c_writer)
        try:
            assert self._restored is not None
            await self._restored.wait()
            try:
                d_reader, d_writer = await asyncio.open_connection(LOOPBACK, port)
            except OSError:
                return
            self._writers.add(d_writer)
            self._connections += 1
            try:
                await asyncio.gather(
                    self._pump(c_reader, d_writer, "fwd"), self._pump(d_reader, c_writer, "rev")
                )
            finally:
                self._writers.discard(d_writer)
                d_writer.close()
        finally:
            self._writers.discard(c_writer)
            c_writer.close()

    def _delay(self, direction: str) -> float:
        return self.spec.delay_fwd_s if direction == "fwd" else self.spec.delay_rev_s

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str
    ) -> None:
        """Read, charge the transmitter, hold for the delay, write; EOF travels the same way."""
        loop = asyncio.get_running_loop()
        lane = self._lanes[direction]
        line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        deliver = asyncio.ensure_future(self._deliver(line, writer, lane))
        try:
            while True:
                assert self._restored is not None
                await self._restored.wait()
                rate = self.spec.rate_bps
                limit = self.spec.effective_queue_bytes()
                if rate is not None and limit is not None:
                    backlog = (lane.tx_free - loop.time()) * rate / 8
                    if backlog > limit:
                        await asyncio.sleep((backlog - limit) * 8 / rate)
                        continue
                try:
                    data = await reader.read(CHUNK)
                except OSError:
                    data = b""
                now = loop.time()
                departure = now
                if rate is not None and data:
                    lane.tx_free = max(now, lane.tx_free) + len(data) * WIRE_FACTOR * 8 / rate
                    departure = lane.tx_free
                line.put_nowait((departure + self._delay(direction), data))
                if not data:
                    break
            await deliver
        finally:
            deliver.cancel()

    async def _deliver(
        self, line: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter, lane: _Lane
    ) -> None:
        loop = asyncio.get_running_loop()
        assert self._restored is not None
        while True:
            due, data = await line.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._restored.wait()
            try:
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                lane.bytes += len(data)
                lane.chunks += 1
                await writer.drain()
            except OSError:
                return
