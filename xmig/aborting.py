"""Abort before GO, the same way for every backend: run the abort to its end even when the
migration is cancelled meanwhile (source agent stopped, Ctrl-C, an outer deadline), then
raise what the caller must see."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import NoReturn

from xmig import control
from xmig.errors import MigrationAborted, XmigError
from xmig.transport import Channel, TransportSession

ABORT_DELIVERY_S = 5.0  #: how long an abort waits for the peer to have read ABORT


async def run_abort(abort: Awaitable[None], err: BaseException,
                    on_aborted: Callable[[str], None]) -> NoReturn:
    """Await ``abort`` shielded (a second cancellation waits for it, then propagates);
    call ``on_aborted`` with the error's text; re-raise ``err`` if it is a cancellation, else raise
    MigrationAborted from it (the source guest runs)."""
    aborting = asyncio.ensure_future(abort)
    try:
        await asyncio.shield(aborting)
    except asyncio.CancelledError:
        await asyncio.wait([aborting])
        raise
    on_aborted(f"{type(err).__name__}: {err}")
    if isinstance(err, asyncio.CancelledError):
        raise err
    raise MigrationAborted(f"migration aborted, the source guest runs: {err}") from err


async def tell_abort(session: TransportSession, abort: control.Abort,
                     timeout: float = ABORT_DELIVERY_S) -> None:
    """Send ABORT and wait (bounded) until the peer has read it: the session is torn down
    next, and an ABORT still queued then would leave the destination waiting, paused."""
    with contextlib.suppress(XmigError, TimeoutError):
        async with asyncio.timeout(timeout):
            await session.send(Channel.CONTROL, abort.encode())
            await session.drain(Channel.CONTROL)
