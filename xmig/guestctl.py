"""Blocking guest-control calls (pause, device state, resume) from asyncio, on threads of
their own.

``asyncio.to_thread`` shares the loop's default executor with the data path (page encoding,
disk reads, fsyncs); a pause queued behind those is downtime. These calls get a small
executor of their own, so they start at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_executor: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(4, thread_name_prefix="xmig-guest-control")
        return _executor


async def call(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` on a guest-control thread."""
    return await asyncio.get_running_loop().run_in_executor(_pool(), fn, *args)
