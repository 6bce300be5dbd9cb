"""What the storage engine needs from a guest's disk, and what it offers the guest.

A guest's virtual disk is served by xmig's storage interception point: an NBD server
(``xmig.storage.nbd``) that the reference guest (``xmig.guest.sim``) and QEMU
(``blockdev-mirror`` target, issue 4) both speak to. Every write the guest makes passes
through a :class:`WriteHook`, which is where the asynchronous mirror queues it for the
destination and decides when the guest's write is acknowledged.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol


class BlockBackend(Protocol):
    """A block device the NBD server exports (a raw image file, usually)."""

    @property
    def size(self) -> int: ...

    def pread(self, offset: int, length: int) -> bytes: ...

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def flush(self) -> None:
        """Make every write so far durable (fsync)."""
        ...


class WriteHook(Protocol):
    """Sees every guest write after it reached the local backend; the guest's write is
    acknowledged when the returned awaitable completes (at once while the mirror queue is
    under its bound, later above it: the congestion control of DESIGN.md)."""

    async def on_write(self, offset: int, data: bytes) -> None: ...


class NowaitWriteHook(WriteHook, Protocol):
    """A :class:`WriteHook` with a synchronous fast path, which the NBD server prefers: it
    does ``on_write``'s bookkeeping at once and returns ``None`` when the guest may be
    acknowledged now, else an awaitable that completes when it may (saves a task per
    write)."""

    def write_nowait(self, offset: int, data: bytes) -> Awaitable[None] | None: ...
