"""The destination side: accept connections, authenticate them, route them to sessions.

    async with listen("0.0.0.0", 7800, tls=server_ctx) as listener:
        session = await listener.accept()
        data = await session.recv(Channel.MEMORY)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any, cast

from xmig.errors import (
    ConnectionBroken,
    ConnectionClosed,
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
from xmig.transport.session import Hello, Session, SessionConfig, refusal
from xmig.transport.tls import start_tls_server


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

    def _on_connection(self) -> ConnProtocol:
        proto = ConnProtocol("client", self.config.max_payload, hold_reading=True)
        def admit() -> None:
            self._tg.create_task(self._admit(proto))

        proto.on_made = admit
        return proto

    async def _admit(self, proto: ConnProtocol) -> None:
        try:
            await self._handshake(proto)
        except TransportError as err:
            self.refused.append(err)
            proto.abort(err)

    async def _handshake(self, proto: ConnProtocol) -> None:
        transport = proto.transport
        assert transport is not None
        raw = transport.get_extra_info("socket")
        if raw is not None:
            tune_socket(raw, None)
        peername = transport.get_extra_info("peername")
        proto.peer = f"{peername[0]}:{peername[1]}" if peername else "client"
        if self.tls is not None:
            proto.transport = await start_tls_server(
                transport, proto, self.tls, timeout=HANDSHAKE_TIMEOUT
            )
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
        handle.attach(conn_id, proto)
        handle._on_frames(conn_id, wire_bytes[0])  # whatever came after HELLO

    @staticmethod
    def _refuse(proto: ConnProtocol, code: str, error: str) -> None:
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
    check_security(tls, insecure_plaintext)
    loop = asyncio.get_running_loop()
    with single_errors():
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
