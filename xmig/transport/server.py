"""The destination side: accept connections, authenticate them, route them to sessions.

    policy = PeerPolicy(allow=("*.example.net",))  # default: the CA's whole tree
    async with listen("0.0.0.0", 7800, tls=server_ctx, policy=policy) as listener:
        session = await listener.accept()
        data = await session.recv(Channel.MEMORY)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, cast

from xmig.errors import (
    AuthenticationError,
    ConnectionBroken,
    ConnectionClosed,
    PeerLimitExceeded,
    PeerNotAllowed,
    ProtocolError,
    SessionExpired,
    TransportError,
)
from xmig.transport.driver import (
    HANDSHAKE_TIMEOUT,
    ConnProtocol,
    TransportSession,
    check_security,
    single_errors,
    tune_socket,
)
from xmig.transport.frames import FrameDecoder
from xmig.transport.hello import Hello, refusal
from xmig.transport.peers import HandshakeCounter, PeerIdentity, PeerPolicy, source_address
from xmig.transport.session import Session, SessionConfig
from xmig.transport.tls import peer_address, start_tls_server

log = logging.getLogger(__name__)


#: Seconds a refused connection stays open, reading paused, after its refusal was written:
#: closing with the client's HELLO (or data) unread would reset the connection, and a reset
#: can drop the refusal before the client reads it. The client closes first on reading it.
REFUSAL_LINGER = 1.0
REFUSED_KEPT = 256


class Listener:
    """Accepts connections, authenticates them and routes them to their sessions.

    Every connection is admitted in order: its source address under ``policy.max_handshakes``
    connections not yet past HELLO; TLS (a certificate the CA signed, not revoked); its
    identity allowed by ``policy.allow``; HELLO; a session it resumes opened by the same
    certificate; its certificate under ``policy.max_connections`` and, for a new session,
    ``policy.max_sessions``. A refused connection gets a typed refusal (WELCOME with a code,
    :data:`~xmig.transport.hello.REFUSALS`) where TLS let it that far, is recorded in
    :attr:`refused` and logged; nothing else changes.
    """

    def __init__(self, tls: ssl.SSLContext | None, config: SessionConfig,
                 tg: asyncio.TaskGroup, policy: PeerPolicy | None = None) -> None:
        self.tls = tls
        self.config = config
        self.policy = policy or PeerPolicy()
        self._tg = tg
        self.sessions: dict[str, TransportSession] = {}
        self._accepted: asyncio.Queue[TransportSession] = asyncio.Queue()
        #: the connections refused lately, oldest first (the last :data:`REFUSED_KEPT`,
        #: without their tracebacks: a flood of refusals must not hold memory)
        self.refused: deque[TransportError] = deque(maxlen=REFUSED_KEPT)
        self.refused_total = 0  #: connections refused since the listener started
        self.server: asyncio.Server | None = None
        self._handshakes = HandshakeCounter(self.policy.max_handshakes)
        self._pending: set[ConnProtocol] = set()  # accepted, not (yet) attached to a session
        self._lingering: set[ConnProtocol] = set()  # refusal written, close pending

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def accept(self) -> TransportSession:
        """The next new session."""
        return await self._accepted.get()

    def held_sessions(self, key: str) -> int:
        """Open sessions opened by the peer ``key`` (:attr:`PeerIdentity.key`)."""
        return sum(
            1 for h in self.sessions.values()
            if h.identity is not None and h.identity.key == key and not h._finished.is_set()
        )

    def held_connections(self, key: str) -> int:
        """Connections attached to sessions of the peer ``key``."""
        return sum(
            len(h._conns) for h in self.sessions.values()
            if h.identity is not None and h.identity.key == key
        )

    def _on_connection(self) -> ConnProtocol:
        proto = ConnProtocol("client", self.config.max_payload, hold_reading=True)
        def admit() -> None:
            self._tg.create_task(self._admit(proto))

        proto.on_made = admit
        return proto

    async def _admit(self, proto: ConnProtocol) -> None:
        assert proto.transport is not None
        proto.peer = peer_address(proto.transport) or "client"
        address = source_address(proto.transport.get_extra_info("peername"))
        if not self._handshakes.begin(address):
            err = PeerLimitExceeded(
                f"{address} already has {self._handshakes.held(address)} connections in "
                f"their handshake, the most this agent allows one address (max_handshakes)"
            )
            self._record(err)
            proto.abort(err)
            return
        self._pending.add(proto)
        try:
            try:
                await self._handshake(proto, address)
            except TransportError:
                raise
            except Exception as bug:  # one connection must never take the listener down
                log.exception("admitting a connection from %s failed", proto.peer)
                raise ProtocolError(
                    f"{proto.peer}: admitting the connection failed: {type(bug).__name__}: {bug}"
                ) from bug
        except TransportError as err:
            self._record(err)
            if proto in self._lingering:
                await asyncio.wait([proto.closed], timeout=REFUSAL_LINGER)
            proto.abort(err)
        finally:
            self._handshakes.end(address)
            self._pending.discard(proto)
            self._lingering.discard(proto)

    def _record(self, err: TransportError) -> None:
        log.warning("refused a connection: %s: %s", type(err).__name__, err)
        cause: BaseException | None = err
        while cause is not None:
            cause.__traceback__ = None
            cause = cause.__cause__
        self.refused.append(err)
        self.refused_total += 1

    async def _handshake(self, proto: ConnProtocol, address: str) -> None:
        transport = proto.transport
        assert transport is not None
        raw = transport.get_extra_info("socket")
        if raw is not None:
            tune_socket(raw, None)
        if self.tls is not None:
            proto.transport = await start_tls_server(
                transport, proto, self.tls, timeout=HANDSHAKE_TIMEOUT
            )
        identity = self._identity(proto, address)
        if self.policy.allowed_by(identity) is None:
            log.warning("%s matches none of the --allow patterns %s", identity,
                        ", ".join(self.policy.allow))
            raise self._refuse(proto, "not-allowed", PeerNotAllowed(
                f"{identity} is not allowed by this agent: neither its subject nor its names "
                "match its --allow patterns"
            ))
        hello, decoder, wire_bytes = await self._read_hello(proto)
        self._route(proto, identity, hello, decoder, wire_bytes)

    def _identity(self, proto: ConnProtocol, address: str) -> PeerIdentity:
        if self.tls is None:
            return PeerIdentity.of_address(address)
        assert proto.transport is not None
        ssl_object = proto.transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            raise AuthenticationError(f"{proto.peer} presented no TLS certificate")
        try:
            return PeerIdentity.of_certificate(der, address)
        except ValueError as err:
            raise AuthenticationError(
                f"the certificate of {proto.peer} cannot be read: {err}"
            ) from err

    async def _read_hello(self, proto: ConnProtocol) -> tuple[Hello, FrameDecoder, int]:
        """Wait for the connection's HELLO; also the bytes read with it."""
        transport = proto.transport
        assert transport is not None
        decoder = proto.decoder
        got_hello: asyncio.Future[Hello] = asyncio.get_running_loop().create_future()
        wire_bytes = [0]

        def on_frames(nbytes: int) -> None:
            wire_bytes[0] += nbytes
            if got_hello.done():
                return
            try:
                frame = decoder.next_frame()
                if frame is not None:
                    got_hello.set_result(Hello.decode(frame))
            except TransportError as err:
                got_hello.set_exception(err)

        proto.on_frames = on_frames
        on_frames(0)  # TLS may have handed over HELLO with the handshake's last read
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
        return got_hello.result(), decoder, wire_bytes[0]

    def _route(self, proto: ConnProtocol, identity: PeerIdentity, hello: Hello,
               decoder: FrameDecoder, wire_bytes: int) -> None:
        """Attach the connection to the session its HELLO names, or refuse it."""
        if hello.max_payload != self.config.max_payload:
            why = f"max_payload {hello.max_payload} != {self.config.max_payload}"
            raise self._refuse(proto, "incompatible", ProtocolError(f"{proto.peer}: {why}"))
        sid = hello.session_id
        handle = self.sessions.get(sid)
        if handle is not None and handle._finished.is_set():
            handle = None
        owner = handle.identity if handle is not None else None
        if identity.authenticated and owner is not None and owner.key != identity.key:
            raise self._refuse(proto, "not-owner", AuthenticationError(
                f"{identity} may not join session {sid[:8]}: another certificate opened it "
                "(a session is resumed only with the certificate that opened it)"
            ))
        policy = self.policy
        if self.held_connections(identity.key) >= policy.max_connections:
            raise self._refuse(proto, "peer-limit", PeerLimitExceeded(
                f"{identity} already has {policy.max_connections} connections, the most "
                "this agent allows one peer (max_connections)"
            ))
        if handle is None:
            if not hello.new:
                raise self._refuse(proto, "unknown-session", SessionExpired(
                    f"{proto.peer} resumes unknown session {sid} (no such session: expired?)"
                ))
            if self.held_sessions(identity.key) >= policy.max_sessions:
                raise self._refuse(proto, "peer-limit", PeerLimitExceeded(
                    f"{identity} already has {policy.max_sessions} sessions open, the most "
                    "this agent allows one peer (max_sessions)"
                ))
            session = Session(sid, client=False, config=self.config, now=time.monotonic())
            handle = TransportSession(session, proto.peer)
            handle.identity = identity
            self.sessions[sid] = handle
            self._tg.create_task(self._run_session(handle))
            self._accepted.put_nowait(handle)
        conn_id = id(proto)
        handle.session.add_connection(conn_id, time.monotonic(), hello=hello, decoder=decoder)
        self._pending.discard(proto)
        handle.attach(conn_id, proto)
        handle._on_frames(conn_id, wire_bytes)  # whatever came after HELLO

    def _refuse(self, proto: ConnProtocol, code: str, error: TransportError) -> TransportError:
        """Send the client a refusal with ``code`` (:data:`REFUSALS`) and ``error``'s text;
        stop reading; the caller raises ``error`` (the connection is closed after a linger)."""
        if proto.transport is not None and not proto.transport.is_closing():
            proto.transport.write(refusal(code, str(error)))
            proto.transport.pause_reading()
            self._lingering.add(proto)
        return error

    async def _run_session(self, handle: TransportSession) -> None:
        try:
            await handle.run_timers()
        finally:
            if self.sessions.get(handle.session.session_id) is handle:
                del self.sessions[handle.session.session_id]


@contextlib.asynccontextmanager
async def listen(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    tls: ssl.SSLContext | None,
    insecure_plaintext: bool = False,
    config: SessionConfig | None = None,
    sock: socket.socket | None = None,
    policy: PeerPolicy | None = None,
) -> AsyncIterator[Listener]:
    """Listen for sessions on ``host:port`` (or on a bound socket ``sock``).

    ``policy`` says which client certificates are taken and how much each may hold
    (:class:`~xmig.transport.peers.PeerPolicy`; default: every certificate the CA signed,
    8 sessions, 64 connections per certificate, 64 handshakes per source address).
    """
    check_security(tls, insecure_plaintext)
    loop = asyncio.get_running_loop()
    with single_errors():
        async with asyncio.TaskGroup() as tg:
            listener = Listener(tls, config or SessionConfig(), tg, policy)
            if sock is not None:
                server = await loop.create_server(listener._on_connection, sock=sock)
            else:
                server = await loop.create_server(listener._on_connection, host, port)
            listener.server = server
            try:
                yield listener
            finally:
                server.close()
                for proto in list(listener._pending):
                    proto.abort(ConnectionClosed("listener closed"))
                for handle in list(listener.sessions.values()):
                    handle._finished.set()
                    handle._timer_changed.set()
                    for proto in list(handle._conns.values()):
                        proto.abort(ConnectionClosed("listener closed"))
