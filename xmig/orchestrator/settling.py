"""Telling a destination agent a journaled decision until it answers, for every backend.

A source settles on a new session (the migration's own is gone), retrying with backoff:

- after GO without RESUMED: the source keeps its paused copy, in doubt, until the agent
  answers RESUMED (it runs there) or EpochAbandoned (it restarted without its copy);
- after an ABORT that may not have reached a destination that voted READY (the link was
  cut in the blackout, and the blackout's deadline aborted): the source guest runs, and
  the destination holds a paused copy until it hears ABORT. Presumed abort is only safe
  for the source if it keeps saying so: the agent answers DISCARDED, or GuestNotFound when
  it knows nothing of the migration (it discarded before READY, on its own).

The agent ends a receiving session still open for the migration when its source settles
(:mod:`xmig.service.agentd`), so the answer comes as soon as the link is back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from xmig.errors import XmigError
from xmig.transport import TransportSession, connect
from xmig.transport.certs import PkiPaths
from xmig.transport.tls import client_context

T = TypeVar("T")

FIRST_RETRY_S = 1.0
MAX_RETRY_S = 30.0  #: retries back off, doubling, up to this far apart


@dataclass(frozen=True)
class AgentAddress:
    """Where a source reaches the destination agent of a migration, and as whom."""

    host: str
    port: int
    pki: Path
    server_name: str | None = None
    connect_timeout_s: float = 10.0

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[TransportSession]:
        """A new one-stream session to the agent (client certificate from ``pki``)."""
        tls = client_context(PkiPaths.in_dir(self.pki.absolute(), role="client"))
        async with connect(self.host, self.port, tls=tls,
                           server_hostname=self.server_name or self.host, streams=1,
                           connect_timeout=self.connect_timeout_s) as session:
            yield session


async def keep_telling(agent: AgentAddress, tell: Callable[[TransportSession], Awaitable[T]],
                       *, on_retry: Callable[[float, XmigError], None],
                       final: tuple[type[XmigError], ...] = (),
                       max_retry_s: float = MAX_RETRY_S) -> T:
    """``tell(session)`` on a new session to ``agent`` until it returns, retrying every
    typed error but those in ``final`` (raised) with backoff (``on_retry(delay, error)``
    before each wait). Runs until cancelled otherwise."""
    delay = FIRST_RETRY_S
    while True:
        try:
            async with agent.session() as session:
                return await tell(session)
        except final:
            raise
        except XmigError as err:
            on_retry(delay, err)
        await asyncio.sleep(delay)  # a retry schedule, not a wait for a condition
        delay = min(delay * 2, max_retry_s)
