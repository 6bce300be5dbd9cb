"""The asyncio side of a session: connections, write pumping, timers, the application API.

:class:`TransportSession` wraps the sans-IO :class:`~xmig.transport.session.Session`:
:class:`ConnProtocol` feeds it each connection's bytes, ``_pump`` writes the frames it
chooses round-robin over the connections that have room, and ``run_timers`` calls its
``handle_timer`` when due. :mod:`xmig.transport.client` (``connect``) and
:mod:`xmig.transport.server` (``listen``) open the connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, cast

from xmig.errors import (
    ConfigError,
    ConnectionBroken,
    ConnectionClosed,
    TransportError,
)
from xmig.transport.frames import FrameDecoder, Payload
from xmig.transport.peers import PeerIdentity
from xmig.transport.session import (
    ConnectionDead,
    MessageReceived,
    PeerClosed,
    Session,
    SessionFailed,
    SessionState,
)
from xmig.transport.tls import classify_ssl_error

SocketFactory = Callable[[], socket.socket]

NOTSENT_LOWAT = 1 << 20  # unsent bytes the kernel holds before the socket stops being writable
WRITE_HIGH_WATER = 256 << 10
HANDSHAKE_TIMEOUT = 10.0


def tune_socket(sock: socket.socket, congestion: str | None) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # keep unsent bytes in the kernel small so a control frame never waits behind megabytes
    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_NOTSENT_LOWAT", 25), NOTSENT_LOWAT)
    if congestion:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())


def _as_transport_error(exc: BaseException | None, peer: str) -> TransportError:
    if exc is None:
        return ConnectionBroken(f"connection to {peer} ended")
    if isinstance(exc, TransportError):
        return exc
    if isinstance(exc, ssl.SSLError | OSError | EOFError):
        return classify_ssl_error(exc, peer=peer)
    return ConnectionBroken(f"connection to {peer} failed: {exc!r}")


class ConnProtocol(asyncio.BufferedProtocol):
    """One TCP/TLS connection: received bytes go straight into its frame decoder's buffers
    (no intermediate copies, also under TLS); ``on_frames`` tells the owner; tracks pausing."""

    def __init__(self, peer: str, max_payload: int, *, hold_reading: bool = False) -> None:
        self.peer = peer
        self.hold_reading = hold_reading
        self.decoder = FrameDecoder(max_payload)
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.on_frames: Callable[[int], None] = lambda nbytes: None
        self.on_writable: Callable[[], None] = lambda: None
        self.on_made: Callable[[], None] = lambda: None
        self.closed: asyncio.Future[TransportError] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self.hold_reading:  # until start_tls (or the plaintext HELLO reader) takes over
            self.transport.pause_reading()
        self.on_made()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.decoder.buffer_updated(nbytes)
        self.on_frames(nbytes)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(_as_transport_error(exc, self.peer))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.on_writable()

    def abort(self, error: TransportError) -> None:
        if not self.closed.done():
            self.closed.set_result(error)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


class TransportSession:
    """The application's handle on a session: send and receive messages on channels."""

    def __init__(self, session: Session, peer: str) -> None:
        self.session = session
        self.peer = peer
        self._conns: dict[int, ConnProtocol] = {}
        self._order: deque[int] = deque()
        self._inbox: dict[int, deque[Payload]] = {ch: deque() for ch in session.recv_channels}
        self._readable: dict[int, asyncio.Event] = {
            ch: asyncio.Event() for ch in session.recv_channels
        }
        self._send_space = asyncio.Event()
        self._heard = asyncio.Event()  #: frames came in (acknowledgements among them)
        self._timer_changed = asyncio.Event()
        self._armed: float | None = None
        self._finished = asyncio.Event()
        self._ready = asyncio.Event()
        self._peer_closed = False
        self.ready_conns: set[int] = set()  #: connections that completed HELLO/WELCOME
        self._changed = asyncio.Event()  # a connection came or went
        self.connection_errors: list[TransportError] = []
        #: on the server, who opened the session (only this certificate may resume it)
        self.identity: PeerIdentity | None = None
        self._send_limit = max(2 * session.config.max_payload, 1 << 20)

    # -- application API --------------------------------------------------------------

    async def send(self, channel: int, data: bytes) -> None:
        """Queue ``data`` on ``channel``; waits while the channel already has enough queued."""
        s = self.session
        while s.queued_bytes(channel) >= self._send_limit:
            self._raise_if_unusable()
            self._send_space.clear()
            await self._send_space.wait()
        s.send(channel, data)
        self._after_io()

    async def recv(self, channel: int) -> Payload:
        """The next message on ``channel``, in order, exactly once (large messages come as
        the bytearray they were received into)."""
        inbox = self._inbox[channel]
        while not inbox:
            if self._peer_closed:
                raise ConnectionClosed(f"{self.peer} closed the session")
            self._raise_if_unusable()
            self._readable[channel].clear()
            await self._readable[channel].wait()
        data = inbox.popleft()
        self.session.consume(channel, len(data), time.monotonic())
        self._after_io()
        return data

    async def drain(self, channel: int | None = None) -> None:
        """Wait until the peer's application has consumed everything sent so far (on
        ``channel`` only, if given: a last control message, before the session is left,
        need not wait for bulk data queued behind it)."""
        def done() -> bool:
            if channel is None:
                return self.session.all_acked
            return self.session.send_channels[channel].idle

        while not done():
            self._raise_if_unusable()
            wake = self._send_space if channel is None else self._heard
            wake.clear()
            await wake.wait()

    async def close(self, reason: str = "", timeout: float = 30.0) -> None:
        """Orderly close: wait until all sent data is consumed, exchange CLOSE, disconnect."""
        if self.session.state not in (SessionState.ERROR, SessionState.CLOSED):
            self.session.close(reason)
            self._after_io()
        async with asyncio.timeout(timeout):
            await self._finished.wait()
        self._raise_if_failed()

    def set_rate_cap(self, bps: float | None) -> None:
        """Cap the session's data at ``bps`` bits/s from now (None: the configured cap)."""
        self.session.set_rate_cap(bps, time.monotonic())
        self._after_io()

    @property
    def peer_key(self) -> str:
        """Who opened the session, as :attr:`identity`'s key (its certificate's fingerprint);
        "" where no identity was recorded (the client end)."""
        return self.identity.key if self.identity is not None else ""

    def abort(self, reason: str = "aborted") -> None:
        """End the session now, without the CLOSE exchange: its connections are dropped and
        whoever waits on it is woken (a server done with a peer that went away, which would
        otherwise hold the session until its resume deadline)."""
        if self.session.state not in (SessionState.ERROR, SessionState.CLOSED):
            self.session.fail(ConnectionClosed(reason))
        for proto in list(self._conns.values()):
            proto.abort(ConnectionClosed(reason))
        self._finish()
        self._wake_all()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; it is checked whenever a connection comes or
        goes. Use it under ``asyncio.timeout``."""
        while not predicate():
            self._raise_if_failed()
            self._changed.clear()
            await self._changed.wait()

    def stats(self) -> dict[str, Any]:
        st = self.session.stats(time.monotonic())
        st["connection_errors"] = [type(e).__name__ for e in self.connection_errors]
        return st

    def _raise_if_failed(self) -> None:
        if self.session.state is SessionState.ERROR:
            assert self.session.error is not None
            raise self.session.error

    def _raise_if_unusable(self) -> None:
        self._raise_if_failed()
        if self.session.state is SessionState.CLOSED:
            raise ConnectionClosed("the session is closed")

    # -- connections ------------------------------------------------------------------

    def attach(self, conn_id: int, proto: ConnProtocol) -> None:
        self._conns[conn_id] = proto
        self._order.append(conn_id)
        proto.on_frames = lambda nbytes: self._on_frames(conn_id, nbytes)
        proto.on_writable = self._pump
        proto.closed.add_done_callback(lambda fut: self._on_closed(conn_id, fut.result()))
        self._after_io()

    def _on_frames(self, conn_id: int, nbytes: int) -> None:
        try:
            self.session.receive_frames(conn_id, nbytes, time.monotonic())
        except TransportError as err:
            proto = self._conns.get(conn_id)
            if proto is not None:
                proto.abort(err)
        self._after_io()
        self._heard.set()

    def _on_closed(self, conn_id: int, error: TransportError) -> None:
        if self._conns.pop(conn_id, None) is None:
            return
        self._order.remove(conn_id)
        if self.session.state not in (SessionState.CLOSED, SessionState.CLOSING):
            self.connection_errors.append(error)
        self.session.connection_lost(conn_id, time.monotonic())
        self._changed.set()
        self._after_io()

    # -- the engine -------------------------------------------------------------------

    def _after_io(self) -> None:
        """Process events, write what can be written, re-arm the timer if it moved."""
        self._process_events()
        self._pump()
        timer = self.session.get_timer()
        if timer is not None and (self._armed is None or timer < self._armed):
            self._timer_changed.set()

    def _process_events(self) -> None:
        while (ev := self.session.next_event()) is not None:
            if isinstance(ev, MessageReceived):
                self._inbox[ev.channel].append(ev.data)
                self._readable[ev.channel].set()
            elif isinstance(ev, ConnectionDead):
                proto = self._conns.get(ev.conn)
                if proto is not None:
                    proto.abort(ev.error)
            elif isinstance(ev, PeerClosed):
                self._peer_closed = True
                self._wake_all()
            elif isinstance(ev, SessionFailed):
                self._wake_all()
                for proto in list(self._conns.values()):
                    proto.abort(ev.error)
            else:
                self.ready_conns.add(ev.conn)
                self._ready.set()
                self._changed.set()
        st = self.session.state
        if st in (SessionState.ERROR, SessionState.CLOSED):
            self._finish()

    def _wake_all(self) -> None:
        for ev in self._readable.values():
            ev.set()
        self._changed.set()
        self._send_space.set()
        self._heard.set()
        self._ready.set()

    def _pump(self) -> None:
        """Write frames round-robin over the connections until all are full or idle."""
        s = self.session
        now = time.monotonic()
        active = [c for c in self._order if not self._conns[c].paused]
        sent_any = False
        while active:
            still = []
            for conn_id in active:
                proto = self._conns.get(conn_id)
                if (proto is None or proto.transport is None or proto.paused
                        or proto.transport.is_closing()):
                    continue
                frame = s.frame_to_send(conn_id, now)
                if frame is None:
                    continue
                header, payload = frame
                proto.transport.write(header)
                if payload:  # separately: writelines would join (copy) them first
                    proto.transport.write(payload)
                sent_any = True
                still.append(conn_id)
            active = still
        if self._order:
            self._order.rotate(-1)
        if sent_any or s.all_acked:
            self._send_space.set()
        if s.state is SessionState.CLOSED and s.all_acked:
            self._finish()

    def _finish(self) -> None:
        """The session is over: wake whoever waits for that, the timer task too (it ends)."""
        if not self._finished.is_set():
            self._finished.set()
            self._timer_changed.set()

    async def run_timers(self) -> None:
        """The session's timer task: runs until the session is closed or failed."""
        s = self.session
        while not self._finished.is_set():
            timer = s.get_timer()
            self._armed = timer
            self._timer_changed.clear()
            if timer is None:
                await self._timer_changed.wait()
            else:
                delay = timer - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self._timer_changed.wait()
            s.handle_timer(time.monotonic())
            self._after_io()
        for proto in list(self._conns.values()):
            if proto.transport is not None:
                proto.transport.close()


@contextlib.contextmanager
def single_errors() -> Iterator[None]:
    """Re-raise a task group's lone error as itself, so callers catch typed errors, not
    groups. A group of several distinct errors stays a group."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves: list[BaseException] = []
        stack: list[BaseException] = [group]
        while stack:
            exc = stack.pop()
            if isinstance(exc, BaseExceptionGroup):
                stack.extend(exc.exceptions)
            elif exc not in leaves:
                leaves.append(exc)
        if len(leaves) == 1:
            raise leaves[0] from leaves[0].__cause__
        raise


def check_security(tls: ssl.SSLContext | None, insecure_plaintext: bool) -> None:
    if tls is None and not insecure_plaintext:
        raise ConfigError("no TLS context given: pass one, or insecure_plaintext=True explicitly")
    if tls is not None and insecure_plaintext:
        raise ConfigError("insecure_plaintext=True contradicts the TLS context given")
