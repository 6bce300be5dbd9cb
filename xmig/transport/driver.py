"""The asyncio driver: sockets, TLS and timers around the sans-IO :class:`Session`.

Source side::

    async with connect("dst.example", 7800, tls=client_ctx, streams=4) as session:
        await session.send(Channel.MEMORY, data)

Destination side::

    async with listen("0.0.0.0", 7800, tls=server_ctx) as listener:
        session = await listener.accept()
        data = await session.recv(Channel.MEMORY)

One ``asyncio.TaskGroup`` per session holds its timer task and, on the client, one keeper
task per stream that connects, and reconnects with backoff when the connection breaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from xmig.errors import (
    ConfigError,
    ConnectionBroken,
    ConnectionClosed,
    PeerUnreachable,
    ProtocolError,
    SessionExpired,
    TransportError,
)
from xmig.transport.frames import FrameDecoder
from xmig.transport.session import (
    ConnectionDead,
    Hello,
    MessageReceived,
    PeerClosed,
    Session,
    SessionConfig,
    SessionFailed,
    SessionState,
    refusal,
)
from xmig.transport.tls import classify_ssl_error, start_tls_client, start_tls_server

SocketFactory = Callable[[], socket.socket]

NOTSENT_LOWAT = 1 << 20  # bytes unsent in the kernel before the socket stops being writable
WRITE_HIGH_WATER = 1 << 20
HANDSHAKE_TIMEOUT = 10.0


def _tune_socket(sock: socket.socket, congestion: str | None) -> None:
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


class _ConnProtocol(asyncio.Protocol):
    """Feeds one TCP/TLS connection's bytes to its owner; tracks write pausing."""

    def __init__(self, peer: str, *, hold_reading: bool = False) -> None:
        self.peer = peer
        self.hold_reading = hold_reading
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self._early: list[bytes] = []
        self.on_data: Callable[[bytes], None] = self._early.append
        self.on_writable: Callable[[], None] = lambda: None
        self.on_made: Callable[[], None] = lambda: None
        self.closed: asyncio.Future[TransportError] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self.hold_reading:  # until start_tls (or the plaintext HELLO reader) takes over
            self.transport.pause_reading()
        self.on_made()

    def data_received(self, data: bytes) -> None:
        self.on_data(data)

    def set_reader(self, reader: Callable[[bytes], None]) -> None:
        """Route received bytes to ``reader``, first those that came before it was set
        (TLS may hand over application data in the same read as the handshake's end)."""
        self.on_data = reader
        early, self._early = self._early, []
        for data in early:
            reader(data)

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
        self._conns: dict[int, _ConnProtocol] = {}
        self._order: deque[int] = deque()
        self._inbox: dict[int, deque[bytes]] = {ch: deque() for ch in session.recv_channels}
        self._readable: dict[int, asyncio.Event] = {
            ch: asyncio.Event() for ch in session.recv_channels
        }
        self._send_space = asyncio.Event()
        self._timer_changed = asyncio.Event()
        self._armed: float | None = None
        self._finished = asyncio.Event()
        self._ready = asyncio.Event()
        self._peer_closed = False
        self.connection_errors: list[TransportError] = []
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

    async def recv(self, channel: int) -> bytes:
        """The next message on ``channel``, in order, exactly once."""
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

    async def drain(self) -> None:
        """Wait until the peer's application has consumed everything sent so far."""
        while not self.session.all_acked:
            self._raise_if_unusable()
            self._send_space.clear()
            await self._send_space.wait()

    async def close(self, reason: str = "", timeout: float = 30.0) -> None:
        """Orderly close: wait until all sent data is consumed, exchange CLOSE, disconnect."""
        if self.session.state not in (SessionState.ERROR, SessionState.CLOSED):
            self.session.close(reason)
            self._after_io()
        async with asyncio.timeout(timeout):
            await self._finished.wait()
        self._raise_if_failed()

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

    def attach(self, conn_id: int, proto: _ConnProtocol) -> None:
        self._conns[conn_id] = proto
        self._order.append(conn_id)
        proto.set_reader(lambda data: self._on_data(conn_id, data))
        proto.on_writable = self._pump
        proto.closed.add_done_callback(lambda fut: self._on_closed(conn_id, fut.result()))
        self._after_io()

    def _on_data(self, conn_id: int, data: bytes) -> None:
        try:
            self.session.receive_data(conn_id, data, time.monotonic())
        except TransportError as err:
            proto = self._conns.get(conn_id)
            if proto is not None:
                proto.abort(err)
        self._after_io()

    def _on_closed(self, conn_id: int, error: TransportError) -> None:
        if self._conns.pop(conn_id, None) is None:
            return
        self._order.remove(conn_id)
        if self.session.state not in (SessionState.CLOSED, SessionState.CLOSING):
            self.connection_errors.append(error)
        self.session.connection_lost(conn_id, time.monotonic())
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
                self._ready.set()
        st = self.session.state
        if st in (SessionState.ERROR, SessionState.CLOSED):
            self._finished.set()

    def _wake_all(self) -> None:
        for ev in self._readable.values():
            ev.set()
        self._send_space.set()
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
                if proto is None or proto.transport is None or proto.paused:
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
            self._finished.set()

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


async def _open_connection(
    host: str, port: int, *, tls: ssl.SSLContext | None, server_hostname: str | None,
    socket_factory: SocketFactory | None, congestion: str | None, timeout: float,
) -> _ConnProtocol:
    loop = asyncio.get_running_loop()
    peer = f"{host}:{port}"
    proto = _ConnProtocol(peer)
    try:
        async with asyncio.timeout(timeout):
            if socket_factory is not None:
                sock = socket_factory()
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, (host, port))
                except BaseException:
                    sock.close()
                    raise
                transport, _ = await loop.create_connection(lambda: proto, sock=sock)
            else:
                transport, _ = await loop.create_connection(lambda: proto, host, port)
    except TimeoutError as err:
        raise PeerUnreachable(f"no TCP connection to {peer} within {timeout:.1f}s") from err
    except OSError as err:
        raise PeerUnreachable(f"cannot connect to {peer}: {err.strerror or err}") from err
    raw = transport.get_extra_info("socket")
    if raw is not None:
        _tune_socket(raw, congestion)
    if tls is not None:
        try:
            new = await start_tls_client(
                transport, proto, tls, server_hostname=server_hostname or host, timeout=timeout
            )
        except BaseException:
            transport.abort()
            raise
        proto.transport = new
    assert proto.transport is not None
    proto.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
    return proto


def _check_security(tls: ssl.SSLContext | None, insecure_plaintext: bool) -> None:
    if tls is None and not insecure_plaintext:
        raise ConfigError("no TLS context given: pass one, or insecure_plaintext=True explicitly")
    if tls is not None and insecure_plaintext:
        raise ConfigError("insecure_plaintext=True contradicts the TLS context given")


@contextlib.asynccontextmanager
async def connect(
    host: str,
    port: int,
    *,
    tls: ssl.SSLContext | None,
    server_hostname: str | None = None,
    insecure_plaintext: bool = False,
    streams: int = 4,
    config: SessionConfig | None = None,
    socket_factory: SocketFactory | None = None,
    congestion: str | None = None,
    connect_timeout: float = 10.0,
) -> AsyncIterator[TransportSession]:
    """Open a session to a listening agent with ``streams`` parallel connections.

    Yields once the first connection completed its handshake. Broken connections are
    re-established with backoff; the session fails with :class:`SessionExpired` when no
    connection could be kept for ``config.resume_deadline`` seconds.
    """
    _check_security(tls, insecure_plaintext)
    if streams < 1:
        raise ConfigError(f"streams must be at least 1, not {streams}")
    config = config or SessionConfig()
    peer = f"{host}:{port}"
    session = Session(secrets.token_hex(16), client=True, config=config, now=time.monotonic())
    handle = TransportSession(session, peer)
    next_id = iter(range(1, 1 << 62))
    first_error: list[TransportError] = []

    async def keeper() -> None:
        backoff = 0.05
        while not handle._finished.is_set():
            try:
                proto = await _open_connection(
                    host, port, tls=tls, server_hostname=server_hostname,
                    socket_factory=socket_factory, congestion=congestion,
                    timeout=connect_timeout,
                )
            except TransportError as err:
                first_error.append(err)
                handle.connection_errors.append(err)
                if not session._established and time.monotonic() - t0 > connect_timeout:
                    handle._wake_all()
                    handle._finished.set()
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff):
                        await handle._finished.wait()
                backoff = min(backoff * 2, 2.0)
                continue
            if handle._finished.is_set():
                proto.abort(ConnectionClosed("session finished"))
                return
            conn_id = next(next_id)
            session.add_connection(conn_id, time.monotonic())
            handle.attach(conn_id, proto)
            finished: asyncio.Future[Any] = asyncio.ensure_future(handle._finished.wait())
            closed = cast(asyncio.Future[Any], proto.closed)
            try:
                await asyncio.wait([closed, finished], return_when=asyncio.FIRST_COMPLETED)
            finally:
                finished.cancel()
            if proto.closed.done():
                backoff = 0.05

    t0 = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(handle.run_timers())
        for _ in range(streams):
            tg.create_task(keeper())
        try:
            await handle._ready.wait()
            if not session._established:
                err = first_error[-1] if first_error else PeerUnreachable(f"cannot reach {peer}")
                handle._finished.set()
                handle._raise_if_failed()
                raise err
            yield handle
        finally:
            if not handle._finished.is_set():
                handle._finished.set()
                handle._timer_changed.set()
                for proto in list(handle._conns.values()):
                    proto.abort(ConnectionClosed("session left"))


class Listener:
    """Accepts connections, authenticates them and routes them to their sessions."""

    def __init__(self, tls: ssl.SSLContext | None, config: SessionConfig,
                 tg: asyncio.TaskGroup) -> None:
        self.tls = tls
        self.config = config
        self._tg = tg
        self.sessions: dict[str, TransportSession] = {}
        self._accepted: asyncio.Queue[TransportSession] = asyncio.Queue()
        self.refused: list[TransportError] = []
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def accept(self) -> TransportSession:
        """The next new session."""
        return await self._accepted.get()

    def _on_connection(self) -> _ConnProtocol:
        proto = _ConnProtocol("client", hold_reading=True)
        def admit() -> None:
            self._tg.create_task(self._admit(proto))

        proto.on_made = admit
        return proto

    async def _admit(self, proto: _ConnProtocol) -> None:
        try:
            await self._handshake(proto)
        except TransportError as err:
            self.refused.append(err)
            proto.abort(err)

    async def _handshake(self, proto: _ConnProtocol) -> None:
        transport = proto.transport
        assert transport is not None
        raw = transport.get_extra_info("socket")
        if raw is not None:
            _tune_socket(raw, None)
        peername = transport.get_extra_info("peername")
        proto.peer = f"{peername[0]}:{peername[1]}" if peername else "client"
        if self.tls is not None:
            proto.transport = await start_tls_server(
                transport, proto, self.tls, timeout=HANDSHAKE_TIMEOUT
            )
        decoder = FrameDecoder(self.config.max_payload)
        got_hello: asyncio.Future[Hello] = asyncio.get_running_loop().create_future()

        def on_data(data: bytes) -> None:
            decoder.feed(data)
            if got_hello.done():
                return
            try:
                frame = decoder.next_frame()
                if frame is not None:
                    got_hello.set_result(Hello.decode(frame))
            except TransportError as err:
                got_hello.set_exception(err)

        proto.set_reader(on_data)
        if self.tls is None:
            transport.resume_reading()
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                await asyncio.wait(
                    [got_hello, cast(asyncio.Future[Any], proto.closed)],
                    return_when=asyncio.FIRST_COMPLETED,
                )
        except TimeoutError as err:
            raise ConnectionBroken(f"no HELLO from {proto.peer}") from err
        if not got_hello.done():
            raise proto.closed.result()
        hello = got_hello.result()
        handle = self.sessions.get(hello.session_id)
        if hello.max_payload != self.config.max_payload:
            why = f"max_payload {hello.max_payload} != {self.config.max_payload}"
            self._refuse(proto, "incompatible", why)
            raise ProtocolError(f"{proto.peer}: {why}")
        if handle is None or handle._finished.is_set():
            if not hello.new:
                self._refuse(proto, "unknown-session", "no such session (expired?)")
                raise SessionExpired(f"{proto.peer} resumes unknown session {hello.session_id}")
            session = Session(hello.session_id, client=False, config=self.config,
                              now=time.monotonic())
            handle = TransportSession(session, proto.peer)
            self.sessions[hello.session_id] = handle
            self._tg.create_task(self._run_session(handle))
            self._accepted.put_nowait(handle)
        conn_id = id(proto)
        handle.session.add_connection(conn_id, time.monotonic(), hello=hello, decoder=decoder)
        proto.set_reader(lambda data: None)  # anything after HELLO already sits in decoder
        handle.attach(conn_id, proto)
        if decoder.buffered:
            handle._on_data(conn_id, b"")

    @staticmethod
    def _refuse(proto: _ConnProtocol, code: str, error: str) -> None:
        if proto.transport is not None:
            proto.transport.write(refusal(code, error))
            proto.transport.close()

    async def _run_session(self, handle: TransportSession) -> None:
        try:
            await handle.run_timers()
        finally:
            self.sessions.pop(handle.session.session_id, None)


@contextlib.asynccontextmanager
async def listen(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    tls: ssl.SSLContext | None,
    insecure_plaintext: bool = False,
    config: SessionConfig | None = None,
    sock: socket.socket | None = None,
) -> AsyncIterator[Listener]:
    """Listen for sessions on ``host:port`` (or on a bound socket ``sock``)."""
    _check_security(tls, insecure_plaintext)
    loop = asyncio.get_running_loop()
    async with asyncio.TaskGroup() as tg:
        listener = Listener(tls, config or SessionConfig(), tg)
        if sock is not None:
            server = await loop.create_server(listener._on_connection, sock=sock)
        else:
            server = await loop.create_server(listener._on_connection, host, port)
        listener.server = server
        try:
            yield listener
        finally:
            server.close()
            for handle in list(listener.sessions.values()):
                handle._finished.set()
                handle._timer_changed.set()
                for proto in list(handle._conns.values()):
                    proto.abort(ConnectionClosed("listener closed"))
