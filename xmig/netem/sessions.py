"""Transport sessions across an emulated link: the listener lives in the :class:`Wan`'s
destination host, the connections come from its source host, so every byte crosses the
emulator (with the no-root relay fallback, plain loopback to the relay's endpoint)."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

from xmig.netem.link import Wan
from xmig.transport import Listener, TransportSession, connect, listen


def listen_across(wan: Wan, **kw: Any) -> AbstractAsyncContextManager[Listener]:
    """:func:`xmig.transport.listen` on a socket of the destination host (any port)."""
    if not wan.approximate:
        sock = wan.socket("dst")
        sock.bind(("0.0.0.0", 0))
        sock.listen(16)
        sock.setblocking(False)
        kw["sock"] = sock
    return listen(**kw)


def connect_across(wan: Wan, port: int, **kw: Any
                   ) -> AbstractAsyncContextManager[TransportSession]:
    """:func:`xmig.transport.connect` from the source host to a :func:`listen_across`
    listener's ``port`` (its certificate must name ``wan.dst_addr``)."""
    host, dport = wan.dst_endpoint(port)
    if not wan.approximate:
        kw["socket_factory"] = lambda: wan.socket("src")
    return connect(host, dport, server_hostname=host, **kw)
