"""Abort before GO, the same way for every backend: run the abort to its end even when the
migration is cancelled meanwhile (source agent stopped, Ctrl-C, an outer deadline), then
raise what the caller must see; and the blackout's deadline, past which a source aborts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NoReturn

from xmig.errors import DeadlineExceeded, MigrationAborted, XmigError
from xmig.protocol import control
from xmig.transport import Channel, TransportSession

ABORT_DELIVERY_S = 5.0  #: how long an abort waits for the peer to have read ABORT


async def run_abort(abort: Awaitable[bool], err: BaseException,
                    on_aborted: Callable[[str], None]) -> NoReturn:
    """Await ``abort`` shielded (a second cancellation waits for it, then propagates);
    call ``on_aborted`` with the error's text; re-raise ``err`` if it is a cancellation,
    else raise MigrationAborted from it (the source guest runs). ``abort`` returns whether
    the destination may hold a paused copy that has not heard ABORT (MigrationAborted's
    ``abort_unconfirmed``)."""
    aborting = asyncio.ensure_future(abort)
    try:
        unconfirmed = await asyncio.shield(aborting)
    except asyncio.CancelledError:
        await asyncio.wait([aborting])
        raise
    on_aborted(f"{type(err).__name__}: {err}")
    if isinstance(err, asyncio.CancelledError):
        raise err
    raise MigrationAborted(f"migration aborted, the source guest runs: {err}",
                           abort_unconfirmed=unconfirmed) from err


async def tell_abort(session: TransportSession, abort: control.Abort,
                     timeout: float = ABORT_DELIVERY_S) -> bool:
    """Send ABORT and wait (bounded) until the peer has read it: the session is torn down
    next, and an ABORT still queued then would leave the destination waiting, paused.
    Whether it was read."""
    try:
        async with asyncio.timeout(timeout):
            await session.send(Channel.CONTROL, abort.encode())
            await session.drain(Channel.CONTROL)
    except (XmigError, TimeoutError):
        return False
    return True


@contextlib.asynccontextmanager
async def blackout_deadline(limit_s: float, *, armed: bool,
                            where: Callable[[], str]) -> AsyncIterator[Callable[[], None]]:
    """Bound the steps from the pause to GO by ``limit_s``: from now if ``armed``, else from
    when the yielded ``arm()`` is called (the moment the guest paused). Past it the body is
    cancelled and :class:`~xmig.errors.DeadlineExceeded` raised, saying ``where()``; the
    caller aborts (GO is not journaled yet) and its guest runs on."""
    loop = asyncio.get_running_loop()
    deadline = asyncio.timeout_at(loop.time() + limit_s if armed else None)

    def arm() -> None:
        deadline.reschedule(loop.time() + limit_s)

    try:
        async with deadline:
            yield arm
    except TimeoutError as err:
        if not deadline.expired():
            raise
        raise DeadlineExceeded(f"the blackout passed its deadline of {limit_s:g} s "
                               f"({where()})") from err
