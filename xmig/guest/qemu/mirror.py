"""The source QEMU's disk, mirrored into xmig's NBD server and shipped on the session.

::

    source QEMU --blockdev-mirror (sync full, write-blocking)--> NbdServer (unix socket)
        --> DiskSender (the server's write hook: bounded asynchronous mirror)
        ==DISK_MIRROR / DISK_BULK==> DiskReceiver --> the destination image

The NBD server's backend is a *shadow* image on the source host (sparse, created here):
QEMU's full sync writes the whole disk into it, so the destination receives every block
through the mirror, and the DiskSender's own bulk copy, which scans the shadow, only picks
up what QEMU wrote above its cursor. Every write reaches the destination exactly once in
order either way. Guest writes wait for their NBD acknowledgement (``write-blocking``),
which the DiskSender delays while its queue is over its bound: the guest's writes are slowed
to the link's pace, as the reference guest's are.

At switchover (the source paused at ``pre-switchover``): the bound is lifted,
``block-job-cancel`` (after READY it completes the job without pivot: both images equal),
then the sender is *sealed* (every write handed to the session): all local, no round trip.
The sealed sequence number goes in FINAL; the destination applies up to it before READY.

To abort (:meth:`SourceDiskMirror.close` with the job running): the sender stops (every
write acknowledged at once), the guest's vCPUs stop for the force-cancel (QEMU 7.2 frees
state a guest write in flight still uses when a mirror job is cancelled), the node goes once
the job has ended, the NBD server last; the vCPUs run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener

from xmig.errors import QemuError, XmigError
from xmig.guest.qemu.machine import QemuGuest
from xmig.storage.engine import DEFAULT_BOUND, DiskSender
from xmig.storage.nbd import NbdServer
from xmig.storage.raw import RawFileBackend
from xmig.transport import TransportSession

JOB = "xmig-mirror"
NODE = "xmig-nbd"
JOB_EVENTS = ("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED",
              "BLOCK_JOB_ERROR")


def disk_size(guest: QemuGuest) -> int:
    """Bytes of the source QEMU's disk (0 without one)."""
    if guest.disk_bytes is not None:
        return guest.disk_bytes
    disk = guest.config.disk
    if disk is None:
        return 0
    fd = os.open(disk, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)  # a file or a block device
    finally:
        os.close(fd)


class SourceDiskMirror:
    """Mirrors ``guest``'s disk (drive ``device``) to the destination agent."""

    def __init__(self, session: TransportSession, guest: QemuGuest, *, workdir: Path,
                 epoch: int, device: str | None = None, bound: int = DEFAULT_BOUND) -> None:
        self.session = session
        self.guest = guest
        self.device = device or guest.disk_device
        self.size = disk_size(guest)
        self.shadow_path = workdir / f"{guest.config.name}.mirror.raw"
        self.socket = workdir / f"{guest.config.name}.nbd"
        # a shadow left by a migration whose process was killed: nothing else holds it
        # (QEMU serves one QMP client, so one migration of a guest at a time)
        self.shadow_path.unlink(missing_ok=True)
        self.shadow = RawFileBackend.create(self.shadow_path, self.size)
        self.sender = DiskSender(session, self.shadow, epoch=epoch, bound=bound)
        self.nbd = NbdServer(self.shadow, self.sender)
        self._events: EventListener | None = None
        self._listening = contextlib.ExitStack()
        self._job = False
        self._node = False
        #: (max, p99) acknowledgement delay, seconds, while the job copied the disk
        self.copy_ack_delay = (0.0, 0.0)

    async def start(self, timeout: float) -> None:
        """Start the mirror job and wait until it is READY (the full copy reached the NBD
        server: it is then on its way to the destination)."""
        await self.sender.start()
        await self.nbd.start_unix(self.socket)
        self._events = self._listening.enter_context(self.guest.listener(*JOB_EVENTS))
        await self.guest.execute("blockdev-add", {
            "driver": "nbd", "node-name": NODE, "export": self.nbd.name,
            "server": {"type": "unix", "path": str(self.socket)}})
        self._node = True
        await self.guest.execute("blockdev-mirror", {
            "job-id": JOB, "device": self.device, "target": NODE, "sync": "full",
            "copy-mode": "write-blocking"})
        self._job = True
        await self._wait_job({"BLOCK_JOB_READY"}, timeout)
        # the job's own copy (1 MiB writes, many in flight, held by the bound) is counted
        # apart from the writes that follow, the guest's
        self.copy_ack_delay = self.sender.mirror.stats.restart_delays()

    async def _wait_job(self, wanted: set[str], timeout: float, *,
                        watch_sender: bool = True) -> dict[str, Any]:
        """The job's next event in ``wanted`` (its other ends raise); with ``watch_sender``
        a failed disk copy ends the wait with its typed error (a stopped sender counts as
        failed: after :meth:`DiskSender.stop` wait without it)."""
        assert self._events is not None
        watch = asyncio.ensure_future(
            self.sender.watch() if watch_sender else asyncio.Event().wait())
        try:
            async with asyncio.timeout(timeout):
                while True:
                    get = asyncio.ensure_future(self._events.get())
                    try:
                        await asyncio.wait([get, watch], return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        if not get.done():
                            get.cancel()
                    if not get.done() or get.cancelled():
                        watch.result()  # the disk copy failed: its typed error
                    event = get.result()
                    data: Any = event.get("data", {})
                    if data.get("device") != JOB:
                        continue
                    name = str(event["event"])
                    if name in wanted:
                        return dict(data)
                    if name in ("BLOCK_JOB_ERROR", "BLOCK_JOB_CANCELLED",
                                "BLOCK_JOB_COMPLETED"):
                        raise QemuError(f"disk mirror job ended: {name} {data}")
        except TimeoutError:
            raise QemuError(f"disk mirror job: no {sorted(wanted)} within {timeout:g} s"
                            ) from None
        finally:
            watch.cancel()

    async def finish(self, timeout: float) -> int:
        """With the guest paused: complete the job without pivot, seal the sender; the
        last mirror sequence number (for FINAL)."""
        self.sender.set_bound(1 << 62)  # the job's last writes must not wait on the bound
        await self.guest.execute("block-job-cancel", {"device": JOB})
        data = await self._wait_job({"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"}, timeout)
        self._job = False
        if data.get("error"):
            raise QemuError(f"disk mirror job failed: {data['error']}")
        return await self.sender.seal()

    def progress(self) -> dict[str, Any]:
        p = self.sender.progress()
        return {"mirror_bytes": p.mirror_bytes, "mirror_bytes_sent": p.mirror_bytes_sent,
                "bulk_data_bytes": p.bulk_data_bytes, "acks_delayed": p.acks_delayed,
                "ack_delay_max_s": p.ack_delay_max_s, "ack_delay_p99_s": p.ack_delay_p99_s,
                "copy_ack_delay_max_s": self.copy_ack_delay[0],
                "copy_ack_delay_p99_s": self.copy_ack_delay[1]}

    async def close(self) -> None:
        """Stop everything (after GO, or to abort) and remove the shadow image. A job still
        running is force-cancelled with the guest's vCPUs stopped (:meth:`_quiesced`), the
        source disk untouched; the node is deleted once the job has ended, and the NBD
        server answers (every write at once, the sender stopped) until QEMU let it go.

        Why the vCPUs stop: QEMU 7.2's ``mirror_run`` (block/mirror.c) leaves a cancelled
        or failed job through ``immediate_exit``, which waits for the job's own copy
        operations only, frees ``in_flight_bitmap`` and only then drains the source;
        a guest write in flight through the write-blocking filter then completes into
        ``active_write_settle`` -> ``bitmap_clear(s->in_flight_bitmap)``: a write to freed
        memory (a 32-byte chunk for a 16 MiB disk). ASan build of the same source, the
        destination QEMU killed in pre-copy: ``heap-use-after-free ... in bitmap_clear``,
        freed by ``mirror_run`` mirror.c:1116, in 3 of 12 loaded runs; the stock build's
        cores: a bit cleared in a freed 0x30 fastbin chunk's link, glibc's abort at the
        next QMP command's 4 KiB ``qdict_new``. QEMU's ``stop`` drains every guest
        request (virtio's pending kicks first) and no new one comes until ``cont``: none
        can be in flight when the job exits. A job failing by itself takes the same exit:
        the NBD server fails a write only when the local shadow does (a failed or stopped
        sender acknowledges). (The wait for the job's end used to watch the stopped
        sender, which ended it at once: ``blockdev-del`` raced the job's exit.)"""
        with contextlib.suppress(XmigError):
            await self.sender.stop()  # held writes acknowledged, later ones at once
        async with self._quiesced(self._job):
            if self._job:
                with contextlib.suppress(XmigError):
                    await self.guest.execute("block-job-cancel",
                                             {"device": JOB, "force": True})
                    await self._wait_job({"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"},
                                         10, watch_sender=False)
                self._job = False
            self._listening.close()
            if self._node:
                with contextlib.suppress(XmigError):
                    await self.guest.execute("blockdev-del", {"node-name": NODE})
                self._node = False
            await self.nbd.close()
        self.shadow.close()
        self.shadow_path.unlink(missing_ok=True)

    @contextlib.asynccontextmanager
    async def _quiesced(self, needed: bool) -> AsyncIterator[None]:
        """With ``needed``: the guest's vCPUs stopped (QMP ``stop``, which drains its disk
        requests) if they run, and continued after, unless QEMU moved on meanwhile (e.g. a
        migration's ``finish-migrate``: ``cont`` is its owner's then)."""
        paused = False
        if needed:
            with contextlib.suppress(XmigError):
                if await self.guest.status() == "running":
                    await self.guest.stop()
                    paused = True
        try:
            yield
        finally:
            if paused:
                with contextlib.suppress(XmigError):
                    if await self.guest.status() == "paused":
                        await self.guest.cont()
