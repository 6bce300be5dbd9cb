"""The source side: open a session to a listening agent, keep its connections up.

    async with connect("dst.example", 7800, tls=client_ctx, streams=2) as session:
        await session.send(Channel.MEMORY, data)

One keeper task per stream connects, and reconnects when its connection breaks
(overlapping attempts, :mod:`xmig.transport.redial`); the session resumes from the last
frame the peer consumed on each channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any, cast

from xmig.errors import (
    AuthenticationError,
    ConfigError,
    ConnectionBroken,
    ConnectionClosed,
    PeerUnreachable,
    TransportError,
)
from xmig.transport.driver import (
    WRITE_HIGH_WATER,
    ConnProtocol,
    SocketFactory,
    TransportSession,
    check_security,
    single_errors,
    tune_socket,
)
from xmig.transport.redial import (
    MAX_BACKOFF,
    MIN_BACKOFF,
    Redial,
    attempt_timeout,
    redial_interval,
)
from xmig.transport.session import Session, SessionConfig
from xmig.transport.tls import start_tls_client

DEFAULT_STREAMS = 2
DEFAULT_CONGESTION = "bbr"


async def _open_connection(
    host: str, port: int, *, tls: ssl.SSLContext | None, server_hostname: str | None,
    max_payload: int,
    socket_factory: SocketFactory | None, congestion: str | None, timeout: float,
) -> ConnProtocol:
    loop = asyncio.get_running_loop()
    peer = f"{host}:{port}"
    proto = ConnProtocol(peer, max_payload)
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
        tune_socket(raw, congestion)
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


@contextlib.asynccontextmanager
async def connect(
    host: str,
    port: int,
    *,
    tls: ssl.SSLContext | None,
    server_hostname: str | None = None,
    insecure_plaintext: bool = False,
    streams: int = DEFAULT_STREAMS,
    config: SessionConfig | None = None,
    socket_factory: SocketFactory | None = None,
    congestion: str | None = DEFAULT_CONGESTION,
    connect_timeout: float = 10.0,
) -> AsyncIterator[TransportSession]:
    """Open a session to a listening agent with ``streams`` parallel connections.

    Yields once the first connection completed its handshake. Broken connections are
    re-established by overlapping attempts (a new one every max(0.25 s, 1.5 min RTT) while
    the earlier ones wait, up to 8; refusals back off 50 ms doubling to 1 s); the session
    fails with :class:`SessionExpired` when no connection could be kept for
    ``config.resume_deadline`` seconds.

    ``congestion`` is the TCP congestion control of the session's sockets (ignored where the
    kernel lacks it; ``None``: the system's). Defaults chosen by measurement
    (``bench/transport.py``): BBR keeps 0.93 of a 100 Mbit/s x 100 ms link with 0.1 % loss,
    where CUBIC falls to 0.24; on a clean 1 Gbit/s x 200 ms link CUBIC reaches 0.964 (the TCP
    ceiling), BBR 0.93. Two streams: one BBR stream 0.91, two 0.93, four 0.74-0.87 (BBR
    flows overrun a one-BDP queue together).
    """
    check_security(tls, insecure_plaintext)
    if streams < 1:
        raise ConfigError(f"streams must be at least 1, not {streams}")
    config = config or SessionConfig()
    peer = f"{host}:{port}"
    session = Session(secrets.token_hex(16), client=True, config=config, now=time.monotonic())
    handle = TransportSession(session, peer)
    next_id = iter(range(1, 1 << 62))
    errors: list[TransportError] = []

    def give_up(err: TransportError) -> None:
        session.fail(err)
        handle._after_io()

    async def pause(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await handle._finished.wait()

    def discard(task: asyncio.Task[ConnProtocol]) -> None:
        # an attempt that lost the race: close what it opened, retrieve what it raised
        if not task.cancelled() and task.exception() is None:
            task.result().abort(ConnectionClosed("another attempt connected first"))

    async def redial() -> ConnProtocol | None:
        """Reconnect an established session: overlapping attempts (:mod:`.redial`), the
        first to complete wins; None once the session finished. Raises only what retrying
        cannot help (AuthenticationError)."""
        plan = Redial(redial_interval(session.rtt.min_rtt), time.monotonic())
        attempts: dict[asyncio.Task[ConnProtocol], float] = {}
        finished: asyncio.Future[Any] = asyncio.ensure_future(handle._finished.wait())
        try:
            while not handle._finished.is_set():
                now = time.monotonic()
                wait = plan.due(now)
                if wait == 0.0:
                    task = asyncio.ensure_future(_open_connection(
                        host, port, tls=tls, server_hostname=server_hostname,
                        socket_factory=socket_factory, congestion=congestion,
                        timeout=attempt_timeout(session.rtt.srtt, connect_timeout),
                        max_payload=config.max_payload,
                    ))
                    attempts[task] = now
                    plan.started(now)
                    continue
                done, _ = await asyncio.wait(
                    [*attempts, finished], timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                for fut in done:
                    if fut is finished:
                        continue
                    ended = cast(asyncio.Task[ConnProtocol], fut)
                    began = attempts.pop(ended)
                    err = ended.exception()
                    if err is None:
                        plan.connected()
                        return ended.result()
                    if isinstance(err, AuthenticationError) or not isinstance(
                        err, TransportError
                    ):
                        raise err
                    errors.append(err)
                    handle.connection_errors.append(err)
                    plan.failed(time.monotonic(), began)
            return None
        finally:
            finished.cancel()
            for task in attempts:
                task.cancel()
                task.add_done_callback(discard)

    async def keeper() -> None:
        backoff = MIN_BACKOFF
        while not handle._finished.is_set():
            if session._established:
                try:
                    maybe = await redial()
                except AuthenticationError as err:  # retrying cannot help
                    handle.connection_errors.append(err)
                    give_up(err)
                    return
                if maybe is None:
                    return
                proto = maybe
            else:
                try:
                    proto = await _open_connection(
                        host, port, tls=tls, server_hostname=server_hostname,
                        socket_factory=socket_factory, congestion=congestion,
                        timeout=connect_timeout, max_payload=config.max_payload,
                    )
                except AuthenticationError as err:  # retrying cannot help
                    handle.connection_errors.append(err)
                    give_up(err)
                    return
                except TransportError as err:
                    errors.append(err)
                    handle.connection_errors.append(err)
                    if time.monotonic() - t0 > connect_timeout:
                        give_up(err)
                        return
                    await pause(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                    continue
            if handle._finished.is_set():
                proto.abort(ConnectionClosed("session finished"))
                return
            conn_id = next(next_id)
            session.add_connection(conn_id, time.monotonic(), decoder=proto.decoder)
            handle.attach(conn_id, proto)
            finished: asyncio.Future[Any] = asyncio.ensure_future(handle._finished.wait())
            closed = cast(asyncio.Future[Any], proto.closed)
            try:
                await asyncio.wait([closed, finished], return_when=asyncio.FIRST_COMPLETED)
            finally:
                finished.cancel()
            if not proto.closed.done():
                return
            if conn_id in handle.ready_conns:
                backoff = MIN_BACKOFF
                continue
            # closed before WELCOME: under TLS 1.3 this is how a server refuses our certificate
            why = proto.closed.result()
            if tls is not None and isinstance(why, ConnectionBroken):
                why = AuthenticationError(
                    f"{peer} closed the connection after the TLS handshake, before answering "
                    f"HELLO: it refused our certificate, or it is not an xmig agent ({why})"
                )
                why.__cause__ = proto.closed.result()
            if not session._established:
                give_up(why)
                return
            await pause(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    t0 = time.monotonic()
    with single_errors():
        async with asyncio.TaskGroup() as tg:
            tg.create_task(handle.run_timers())
            for _ in range(streams):
                tg.create_task(keeper())
            try:
                await handle._ready.wait()
                handle._raise_if_failed()
                yield handle
            finally:
                if not handle._finished.is_set():
                    handle._finished.set()
                    handle._timer_changed.set()
                    for proto in list(handle._conns.values()):
                        proto.abort(ConnectionClosed("session left"))


