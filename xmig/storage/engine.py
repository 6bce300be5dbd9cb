"""Asyncio glue: :class:`DiskSender` on the source, :class:`DiskReceiver` on the destination,
over one :class:`~xmig.transport.TransportSession`.

Source::

    sender = DiskSender(session, RawFileBackend(path), epoch=7, bound=16 << 20)
    nbd = NbdServer(sender.backend, sender)   # the sender is the server's WriteHook
    await sender.start()                      # Hello/Ready, then bulk copy + mirror run
    ...                                       # brownout: sender.progress(), set_bound()
    await sender.drain()                      # blackout, guest paused: all applied+fsynced

Destination::

    receiver = DiskReceiver(session, RawFileBackend.create(path, size), epoch=7, fresh=True)
    await receiver.start()
    ...
    await receiver.flush()                    # before voting READY
    receiver.digest()

A failure on either side (DiskTooSmall, DiskFull, StaleEpochError, a broken message) is
sent to the peer as a ``Failed`` message; both sides then stop with that typed error. The
source stops mirroring at once (every held guest write is acknowledged: it is on the local
disk), so the guest runs on untouched, as after an abort.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from xmig.digest import ChunkDigests, Read
from xmig.digest import worker as digest_worker
from xmig.errors import StorageError, TransportError
from xmig.storage.apply import DiskApplier, image_digest, image_digests
from xmig.storage.bulk import CHUNK, BulkPlanner, is_zero
from xmig.storage.disk import BlockBackend
from xmig.storage.mirror import MirrorQueue, Ticket
from xmig.storage.wire import (
    Applied,
    BulkDone,
    BulkExtent,
    Failed,
    Hello,
    MirrorBatch,
    MirrorRecord,
    Ready,
    decode,
    encode,
    error_of,
    failure,
)
from xmig.transport import Channel, TransportSession

log = logging.getLogger(__name__)

DEFAULT_BOUND = 16 << 20
BATCH_BYTES = 1 << 20


@dataclass(frozen=True)
class DiskProgress:
    """A snapshot of the source's disk migration."""

    size: int
    bulk_cursor: int  #: the copier claimed everything below
    bulk_applied: int  #: the destination wrote and fsynced bulk data below
    bulk_done: bool  #: bulk copy complete and applied
    bulk_data_bytes: int  #: non-zero bytes sent by the bulk copy
    bulk_hole_bytes: int
    bulk_zero_bytes: int
    mirror_bound: int
    mirror_queued_bytes: int  #: admitted, not yet applied (≤ bound)
    mirror_held_bytes: int  #: writes whose acknowledgement waits
    mirror_max_queued_bytes: int
    mirror_writes: int
    mirror_bytes: int
    mirror_bytes_sent: int
    mirror_bytes_saved: int  #: kept off the wire by coalescing
    acks_delayed: int
    ack_delay_total_s: float
    ack_delay_max_s: float
    applied_seq: int
    mirror_pace_Bps: float | None = None  #: the acknowledgement pace (None: unpaced)
    ack_delay_p99_s: float = 0.0  #: of every mirrored write (0: acknowledged at once)

    @property
    def pending_bytes(self) -> int:
        """What a drain still has to move (bulk not yet applied is not counted)."""
        return self.mirror_queued_bytes + self.mirror_held_bytes


class _Tasks:
    """The background tasks of one side; the first to fail ends them all."""

    def __init__(self, on_error: Callable[[BaseException], None]) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_error = on_error

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._on_error(exc)

    async def cancel(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


class _DigestKeeper:
    """Chunk digests of an image kept current in the background: :meth:`mark` after a
    change, a task refreshes stale chunks in a worker thread, :meth:`digest` finishes."""

    def __init__(self, digests: ChunkDigests, read: Read) -> None:
        self.digests = digests
        self._read = read
        self._marked = asyncio.Event()
        self._lock = asyncio.Lock()

    def mark(self, start: int, end: int) -> None:
        self.digests.mark(start, end)
        self._marked.set()

    async def run(self) -> None:
        while True:
            await self._marked.wait()
            self._marked.clear()
            async with self._lock:
                await self._refresh()

    async def _refresh(self) -> None:
        await asyncio.get_running_loop().run_in_executor(
            digest_worker(), self.digests.refresh, self._read)

    async def catch_up(self) -> None:
        """One refresh of whatever is stale now (before the blackout, so it has little)."""
        async with self._lock:
            await self._refresh()

    async def digest(self) -> str:
        """Refresh what is still stale (every change must be marked by now) and digest."""
        async with self._lock:
            await self._refresh()
            return self.digests.digest().hex()


def _data_extents(extent_of: Callable[[int], tuple[int, int] | None], size: int
                  ) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size and (extent := extent_of(pos)) is not None:
        out.append(extent)
        pos = extent[1]
    return out


def _as_storage_error(exc: BaseException) -> StorageError | TransportError:
    if isinstance(exc, StorageError | TransportError):
        return exc
    return StorageError(f"disk migration failed: {exc!r}")


class DiskSender:
    """Source side: the NBD server's :class:`~xmig.storage.disk.WriteHook` (the mirror),
    the bulk copier and the mirror sender."""

    def __init__(self, session: TransportSession, backend: BlockBackend, *, epoch: int,
                 bound: int = DEFAULT_BOUND, chunk: int = CHUNK,
                 batch_bytes: int = BATCH_BYTES, verify: bool = False) -> None:
        self.session = session
        self.backend = backend
        self.epoch = epoch
        self.mirror = MirrorQueue(bound, epoch)
        self.planner = BulkPlanner(backend.size, chunk=chunk)
        self.batch_bytes = batch_bytes
        self.error: StorageError | TransportError | None = None
        self.bulk_applied = 0
        self.mirror_bytes_sent = 0
        self.sent_seq = 0  #: the last mirror write handed to the session
        # verify: the image's chunk digests, kept current as the guest writes (the NBD
        # server hands a write to this hook after writing it locally)
        self._digests: _DigestKeeper | None = None
        if verify:
            digests = image_digests(backend.size)
            extent_of = getattr(backend, "data_extent", None)
            if extent_of is not None:  # a sparse image: its holes need no reading
                digests.zero_outside(_data_extents(extent_of, backend.size))
            self._digests = _DigestKeeper(digests, backend.pread)
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._work = asyncio.Event()
        self._changed = asyncio.Event()
        self._pacer = asyncio.Event()  #: the pacer's timer may have changed
        self._tasks = _Tasks(self._fail)
        self._canceller: asyncio.Task[None] | None = None
        self._started = False

    # -- WriteHook --------------------------------------------------------------------------

    async def on_write(self, offset: int, data: bytes) -> None:
        """Queue the part of a guest write below the cursor; return when the guest may be
        acknowledged. The bookkeeping happens before the first await (write order)."""
        fut = self.write_nowait(offset, data)
        if fut is not None:
            await fut

    def write_nowait(self, offset: int, data: bytes) -> asyncio.Future[None] | None:
        """:meth:`on_write` without a coroutine: None if acknowledged at once, else a
        future done when the guest may be acknowledged."""
        if self._digests is not None:
            self._digests.mark(offset, offset + len(data))
        ticket = self.mirror.submit(offset, data, time.monotonic())
        if ticket.length:
            self._work.set()
        if ticket.acked:
            return None
        fut = asyncio.get_running_loop().create_future()
        self._waiting[ticket.id] = fut
        self._pacer.set()
        return fut

    # -- control ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Introduce the disk to the destination (raises its typed refusal, e.g.
        DiskTooSmall or StaleEpochError), then run the bulk copy and the mirror."""
        if self._started:
            raise StorageError("the disk sender is already started")
        self._started = True
        await self.session.send(Channel.DISK_BULK,
                                encode(Hello(self.epoch, self.backend.size)))
        reply = decode(await self.session.recv(Channel.DISK_MIRROR))
        if isinstance(reply, Failed):
            err = error_of(reply)
            self._fail(err)
            raise err
        if not isinstance(reply, Ready):
            raise StorageError(f"expected Ready from the destination, got {reply!r}")
        self._tasks.spawn(self._bulk_loop())
        self._tasks.spawn(self._mirror_loop())
        self._tasks.spawn(self._ack_loop())
        self._tasks.spawn(self._pace_loop())
        if self._digests is not None:
            self._tasks.spawn(self._digests.run())

    def set_bound(self, nbytes: int) -> None:
        """Change the mirror's bound (shrink it as switchover nears)."""
        self._release(self.mirror.set_bound(nbytes, time.monotonic()))

    def set_pace(self, rate_Bps: float | None) -> None:
        """Acknowledge mirrored guest writes at ``rate_Bps`` at most (None: as the bound
        lets them): :meth:`~xmig.storage.mirror.MirrorQueue.set_pace`."""
        if rate_Bps == self.mirror.pace_Bps:
            return
        self._release(self.mirror.set_pace(rate_Bps, time.monotonic()))
        self._pacer.set()

    async def wait_bulk(self) -> None:
        """Until the bulk copy is complete and applied at the destination."""
        await self._wait(lambda: self.bulk_applied >= self.backend.size)

    async def drain(self) -> DiskProgress:
        """Until the bulk copy and every mirrored write are applied and fsynced at the
        destination (call with the guest paused). Raises the typed error if it failed."""
        self._work.set()
        await self._wait(lambda: self.bulk_applied >= self.backend.size and self.mirror.idle)
        return self.progress()

    async def seal(self) -> int:
        """With the guest paused: release every held write (no more acknowledgements
        wait on the bound) and hand every queued write to the session; return the seq of
        the last one. The session delivers them in order, so the destination need only
        apply up to that seq (:meth:`DiskReceiver.wait_applied`) — no round trip here."""
        self.set_pace(None)
        self.set_bound(1 << 62)
        self._work.set()
        await self._wait(lambda: self.bulk_applied >= self.backend.size
                         and not self.mirror.has_work and self.mirror.held_bytes == 0
                         and self.sent_seq >= self.mirror.last_seq)
        return self.mirror.last_seq

    async def digest(self) -> str:
        """With the guest paused: the image's digest (only chunks written since their last
        refresh are read now). Needs ``verify=True``."""
        if self._digests is None:
            raise StorageError("the disk sender keeps no digests (verify=False)")
        return await self._digests.digest()

    async def digests_current(self) -> None:
        """With ``verify``: refresh the disk's digests now (call before pausing the guest,
        so the blackout re-reads only what the guest writes after this)."""
        if self._digests is not None:
            await self._digests.catch_up()

    async def watch(self) -> None:
        """Never returns: raises the sender's typed error as soon as it fails (run it
        beside a phase so a broken disk copy ends that phase at once)."""
        await self._wait(lambda: False)

    async def stop(self) -> None:
        """Stop mirroring and copying (abort): held writes are acknowledged, later writes
        pass straight through. The local disk is never touched by this."""
        self._release(self.mirror.stop(time.monotonic()))
        await self._tasks.cancel()
        self._changed.set()

    def progress(self) -> DiskProgress:
        m, ms, bs = self.mirror, self.mirror.stats, self.planner.stats
        return DiskProgress(
            size=self.backend.size, bulk_cursor=self.planner.cursor,
            bulk_applied=self.bulk_applied,
            bulk_done=self.bulk_applied >= self.backend.size,
            bulk_data_bytes=bs.data_bytes, bulk_hole_bytes=bs.hole_bytes,
            bulk_zero_bytes=bs.zero_bytes, mirror_bound=m.bound,
            mirror_queued_bytes=m.queued_bytes, mirror_held_bytes=m.held_bytes,
            mirror_max_queued_bytes=ms.max_queued_bytes, mirror_writes=ms.writes_mirrored,
            mirror_bytes=ms.bytes_mirrored, mirror_bytes_sent=self.mirror_bytes_sent,
            mirror_bytes_saved=ms.bytes_saved, acks_delayed=ms.writes_delayed,
            ack_delay_total_s=ms.delay_total_s, ack_delay_max_s=ms.delay_max_s,
            applied_seq=m.applied_seq, mirror_pace_Bps=m.pace_Bps,
            ack_delay_p99_s=ms.delay_quantile(0.99))

    # -- internals --------------------------------------------------------------------------

    async def _wait(self, done: Callable[[], bool]) -> None:
        if not self._started:
            raise StorageError("the disk sender was not started")
        while True:
            if self.error is not None:
                raise self.error
            if done():
                return
            if self.mirror.stopped:
                raise StorageError("the disk sender was stopped")
            self._changed.clear()
            await self._changed.wait()

    def _release(self, tickets: list[Ticket]) -> None:
        """Acknowledge the guest's held ``tickets`` (admitted now, or mirroring stopped).
        Admitted ones must go out: wake the mirror's sender, as no new write may come to
        (a paused guest's last writes are often held)."""
        if tickets and self.mirror.has_work:
            self._work.set()
        self._pacer.set()  # the head of the held writes may have changed
        for t in tickets:
            fut = self._waiting.pop(t.id, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = _as_storage_error(exc)
            log.warning("disk sender failed: %s", self.error)
        self._release(self.mirror.stop(time.monotonic()))
        self._changed.set()
        self._canceller = asyncio.get_running_loop().create_task(self._tasks.cancel())

    async def _bulk_loop(self) -> None:
        backend, planner, extent_of = self.backend, self.planner, getattr(
            self.backend, "data_extent", None)
        while not planner.done:
            cursor = planner.cursor
            extent = extent_of(cursor) if extent_of else (cursor, backend.size)
            claim = planner.claim(extent)
            self.mirror.set_cursor(claim.end)  # before reading: later writes are mirrored
            runs: list[tuple[int, memoryview]] = []
            if claim.read_length:
                data = await asyncio.to_thread(backend.pread, claim.read_start,
                                               claim.read_length)
                runs = planner.runs(claim, data)
            msg = BulkExtent(self.epoch, claim.start, claim.end, tuple(runs))
            await self.session.send(Channel.DISK_BULK, encode(msg))
        await self.session.send(Channel.DISK_BULK, encode(BulkDone(self.epoch, backend.size)))

    async def _mirror_loop(self) -> None:
        while True:
            if not self.mirror.has_work:
                self._work.clear()
                await self._work.wait()
                continue
            writes = self.mirror.take(self.batch_bytes)
            records = tuple(
                MirrorRecord(w.seq, w.offset, w.length, None if is_zero(w.data) else w.data)
                for w in writes)
            payload = encode(MirrorBatch(self.epoch, records))
            self.mirror_bytes_sent += len(payload)
            await self.session.send(Channel.DISK_MIRROR, payload)
            self.sent_seq = writes[-1].seq
            self._changed.set()

    async def _pace_loop(self) -> None:
        """The pacer's timer: release the held writes as their credit comes due."""
        while True:
            self._pacer.clear()
            due = self.mirror.get_timer()
            delay = None if due is None else due - time.monotonic()
            if delay is not None and delay <= 0:
                self._release(self.mirror.handle_timer(time.monotonic()))
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._pacer.wait()

    async def _ack_loop(self) -> None:
        while True:
            msg = decode(await self.session.recv(Channel.DISK_MIRROR))
            if isinstance(msg, Failed):
                raise error_of(msg)
            if not isinstance(msg, Applied):
                raise StorageError(f"unexpected disk message from the destination: {msg!r}")
            self.bulk_applied = max(self.bulk_applied, msg.bulk_pos)
            self._release(self.mirror.on_applied(msg.seq, time.monotonic()))
            self._changed.set()


class DiskReceiver:
    """Destination side: applies what the sender sends, fsyncs, reports what is applied."""

    def __init__(self, session: TransportSession, image: BlockBackend, *, epoch: int,
                 fresh: bool = False, verify: bool = False) -> None:
        self.session = session
        self.image = image
        self.applier = DiskApplier(image, epoch=epoch, fresh=fresh)
        self.error: StorageError | TransportError | None = None
        self.fsyncs = 0
        self._dirty = asyncio.Event()  # applied more than reported
        self._changed = asyncio.Event()  # applied more, or failed
        self._hello = asyncio.Event()
        self._reporter: asyncio.Task[None] | None = None
        self._finished = asyncio.Event()
        self._tasks = _Tasks(self._fail)
        self._verify = verify
        self._fresh = fresh
        self._digests: _DigestKeeper | None = None  # made at Hello, when the size is known

    @property
    def epoch(self) -> int:
        return self.applier.epoch

    def fence(self, epoch: int) -> None:
        """Raise this destination's epoch: writes of older epochs are refused from now on."""
        self.applier.fence(epoch)

    async def start(self) -> None:
        """Start receiving in the background (see :meth:`wait`)."""
        self._tasks.spawn(self._bulk_loop())
        self._tasks.spawn(self._mirror_loop())
        self._tasks.spawn(self._sync_loop())

    async def wait(self) -> None:
        """Until the receiver fails (raises the typed error) or is stopped."""
        await self._finished.wait()
        if self.error is not None:
            raise self.error

    async def wait_bulk(self) -> None:
        """Until the whole bulk copy is applied (raises if the receiver failed)."""
        while not self.applier.bulk_done:
            if self.error is not None:
                raise self.error
            if self._finished.is_set():
                raise StorageError("the disk receiver stopped before the bulk copy ended")
            self._changed.clear()
            await self._changed.wait()

    async def wait_applied(self, seq: int) -> None:
        """Until the bulk copy and every mirror write up to ``seq`` are applied (not yet
        fsynced: :meth:`flush` does that)."""
        while not (self.applier.bulk_done and self.applier.applied_seq >= seq):
            if self.error is not None:
                raise self.error
            if self._finished.is_set():
                raise StorageError(f"the disk receiver stopped before mirror seq {seq}")
            self._changed.clear()
            await self._changed.wait()

    async def flush(self) -> None:
        """fsync the image (before voting READY)."""
        if self.error is not None:
            raise self.error
        await asyncio.to_thread(self.image.flush)

    async def stop(self) -> None:
        await self._tasks.cancel()
        self._finished.set()
        self._changed.set()

    def digest(self) -> str:
        """The digest of the image's first source-size bytes, read now (blocking)."""
        return image_digest(self.image, self.applier.source_size)

    async def current_digest(self) -> str:
        """The same digest from the chunk digests kept while applying (``verify=True``):
        only chunks changed since their last refresh are read now."""
        if self._digests is None:
            raise StorageError("the disk receiver keeps no digests (verify=False)")
        return await self._digests.digest()

    def _mark(self, start: int, end: int) -> None:
        if self._digests is not None:
            self._digests.mark(start, end)

    def _fail(self, exc: BaseException) -> None:
        if self.error is not None:
            return
        self.error = err = _as_storage_error(exc)
        log.warning("disk receiver failed: %s", err)
        self._changed.set()

        async def report_and_stop() -> None:
            await self._tasks.cancel()
            if isinstance(err, StorageError):  # tell the source why (best effort)
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5):
                        await self.session.send(Channel.DISK_MIRROR, encode(failure(err)))
            self._finished.set()

        self._reporter = asyncio.get_running_loop().create_task(report_and_stop())

    async def _bulk_loop(self) -> None:
        first = decode(await self.session.recv(Channel.DISK_BULK))
        if not isinstance(first, Hello):
            raise StorageError(f"expected Hello on the bulk channel, got {first!r}")
        ready = self.applier.hello(first)
        if self._verify:
            self._digests = _DigestKeeper(
                image_digests(first.size, known_zero=self._fresh), self.image.pread)
            self._tasks.spawn(self._digests.run())
        await self.session.send(Channel.DISK_MIRROR, encode(ready))
        self._hello.set()
        while not self.applier.bulk_done:
            msg = decode(await self.session.recv(Channel.DISK_BULK))
            if isinstance(msg, BulkExtent):
                self.applier.apply_bulk(msg)
                self._mark(msg.start, msg.end)
            elif isinstance(msg, BulkDone):
                self.applier.apply_done(msg)
            else:
                raise StorageError(f"unexpected message on the bulk channel: {msg!r}")
            self._dirty.set()
            self._changed.set()

    async def _mirror_loop(self) -> None:
        await self._hello.wait()
        while True:
            msg = decode(await self.session.recv(Channel.DISK_MIRROR))
            if not isinstance(msg, MirrorBatch):
                raise StorageError(f"unexpected message on the mirror channel: {msg!r}")
            self.applier.apply_mirror(msg)
            for r in msg.records:
                self._mark(r.offset, r.offset + r.length)
            self._dirty.set()
            self._changed.set()

    async def _sync_loop(self) -> None:
        """fsync, then report what the fsync covered; batches whatever came meanwhile."""
        await self._hello.wait()
        reported = (0, 0)
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            a = self.applier
            now = (a.applied_seq, a.bulk_pos)
            if now == reported:
                continue
            await asyncio.to_thread(self.image.flush)
            self.fsyncs += 1
            await self.session.send(Channel.DISK_MIRROR, encode(Applied(a.epoch, *now)))
            reported = now
