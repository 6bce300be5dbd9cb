"""QEMU's own migration, as QMP shows it: its statuses and events, capabilities, and how
to end an outgoing migration without racing QEMU 7.2's teardown (:func:`cancel_migration`).
Used by both sides of xmig's QEMU backend (:mod:`~xmig.guest.qemu.migrate`,
:mod:`~xmig.guest.qemu.receive`) and by QEMU's native migration (:mod:`~xmig.guest.qemu.native`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from qemu.qmp import EventListener

from xmig.errors import QemuError, XmigError
from xmig.guest.qemu.machine import QemuGuest

FAILED_STATES = frozenset({"failed", "cancelled"})
LIVE_STATES = frozenset({"setup", "active", "pre-switchover", "device", "cancelling"})


async def wait_migration(events: EventListener, guest: QemuGuest, wanted: set[str],
                         timeout: float) -> str:
    """The next MIGRATION event whose status is in ``wanted``; QemuError when the migration
    failed or was cancelled, or nothing came within ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:  # a QEMU that died sends no event: look at it every second
                    event = await asyncio.wait_for(events.get(), 1.0)
                except TimeoutError:
                    if not guest.alive:
                        raise QemuError(f"{guest.config.name}: QEMU is gone (exit status "
                                        f"{guest.returncode}): {guest.log_tail()}") from None
                    continue
                data: Any = event.get("data", {})
                status = str(data.get("status", ""))
                if status in wanted:
                    return status
                if status in FAILED_STATES:
                    why = ""
                    with contextlib.suppress(XmigError):
                        info = await guest.execute("query-migrate")
                        why = f": {info.get('error-desc', '')}"
                    raise QemuError(f"{guest.config.name}: migration {status}{why}")
    except TimeoutError:
        raise QemuError(f"{guest.config.name}: no migration status {sorted(wanted)} within "
                        f"{timeout:g} s") from None


async def set_capabilities(guest: QemuGuest, **caps: bool) -> None:
    await guest.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": name.replace("_", "-"), "state": state} for name, state in caps.items()]})


async def completed_or_message(completing: Awaitable[str],
                                message: asyncio.Future[Any]) -> bool:
    """Wait until QEMU's migration completes (True) or a control message arrives first
    (False); the first error of either ends the wait."""
    task = asyncio.ensure_future(completing)
    try:
        waiting: list[asyncio.Future[Any]] = [task, message]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
            return True
        message.result()  # raises the session's error, if any
        return False
    finally:
        task.cancel()


#: how long QEMU has to fail its migration on its own once its stream is cut
SEVER_WAIT_S = 5.0


async def cancel_migration(source: QemuGuest,
                           sever: Callable[[], Awaitable[None]] | None = None,
                           timeout: float = 10.0) -> None:
    """End QEMU's outgoing migration if it is live, and wait until it ended (QEMU restarts
    the vCPUs it stopped once it ends).

    With ``sever`` (:meth:`SourceTunnel.sever`: our end of its stream shut down both ways
    but kept open), the stream is cut first: QEMU's writes, blocked in a stalled tunnel or
    not, fail with EPIPE and it fails the migration on its own network-failure path; the
    caller closes the socket only after this returned. ``migrate_cancel`` only when QEMU
    writes nothing that could fail (parked at ``pre-switchover``, its migration thread
    waits on a semaphore) or lingers past :data:`SEVER_WAIT_S`: never while a write of its
    stream is blocked.

    Why: QEMU 7.2 with the ``return-path`` capability reads the same socket in a second
    thread, and that thread, on the stream's end or reset, closes the socket itself
    (``source_return_path_thread`` -> ``migration_release_from_dst_file`` ->
    ``qemu_fclose(rp)`` -> ``qio_channel_close``) while the migration thread still writes
    to it, and nothing joins it on a pre-copy failure (only ``migration_completion`` calls
    ``await_return_path_close_on_source``). Seen here: ``sendmsg(-1)`` = EBADF in the
    migration thread after the return-path thread's ``close``, the descriptor reused by the
    main loop. Upstream moved that close into the main thread after a join only in
    8.1.2/8.2. So the source QEMU runs without a return path, and this order keeps QEMU's
    own teardown (``migrate_fd_cleanup``) from racing anything of ours. (The heap
    corruption seen in the same runs was the disk mirror's:
    :meth:`~xmig.guest.qemu.migrate.QemuSource.abort_effects`.)"""
    with source.listener("MIGRATION") as events:
        status = (await source.execute("query-migrate")).get("status")
        if status not in LIVE_STATES:
            return
        if sever is not None:
            await sever()
            if status != "pre-switchover":
                with contextlib.suppress(QemuError):
                    status = await wait_migration(
                        events, source, {"cancelled", "failed", "pre-switchover"},
                        SEVER_WAIT_S)
            if status in FAILED_STATES:
                return
            if (await source.execute("query-migrate")).get("status") not in LIVE_STATES:
                return
        await source.execute("migrate_cancel")
        await wait_migration(events, source, {"cancelled", "failed"}, timeout)


