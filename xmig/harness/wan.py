"""Both ends of one migration's session on this machine, across an emulated WAN: what every
harness (:mod:`~xmig.harness.localrun`, :mod:`~xmig.harness.qemurun`) starts from."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from xmig.netem import Wan
from xmig.netem.sessions import connect_across, listen_across
from xmig.transport import SessionConfig, TransportSession
from xmig.transport.tls import client_context, server_context

#: a harness's session: a cut is noticed in 5 s and resumed within 30 s
HARNESS_SESSION = SessionConfig(idle_timeout=5.0, resume_deadline=30.0)


@contextlib.asynccontextmanager
async def sessions_across(wan: Wan, pki: Any, *, streams: int,
                          config: SessionConfig = HARNESS_SESSION
                          ) -> AsyncIterator[tuple[TransportSession, TransportSession]]:
    """A TLS session across ``wan`` (certificates from ``pki``): the source agent's end
    (``streams`` connections) and the destination agent's."""
    async with (listen_across(wan, tls=server_context(pki), config=config) as lst,
                connect_across(wan, lst.port, tls=client_context(pki), streams=streams,
                               config=config) as session):
        yield session, await lst.accept()
