"""End to end: a guest writing through xmig's NBD server while DiskSender and DiskReceiver
migrate its disk over a real (TLS, rate-capped) TransportSession pair."""

from __future__ import annotations

import asyncio
import random
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.storage.conftest import MiB, make_image
from tests.transport.stacks import make_stack, session_pair
from xmig.errors import DiskFull, DiskTooSmall, StaleEpochError
from xmig.storage.apply import image_digest
from xmig.storage.engine import DiskReceiver, DiskSender
from xmig.storage.mirror import Data, MirrorQueue
from xmig.storage.nbd import NbdServer
from xmig.storage.nbdclient import NbdClient
from xmig.storage.raw import RawFileBackend
from xmig.transport import SessionConfig

LINK = SessionConfig(rate_cap_bps=80e6)  # 10 MB/s: slower than the guest on loopback


class CheckedMirror(MirrorQueue):
    """Checks the bound at every admission and tells the test when a write is held."""

    def __init__(self, bound: int, epoch: int) -> None:
        super().__init__(bound, epoch)
        self.violations: list[tuple[int, int]] = []
        self.held = asyncio.Event()

    def _admit(self, offset: int, data: Data) -> None:
        alone = self.queued_bytes == 0
        super()._admit(offset, data)
        if self.queued_bytes > self.bound and not alone:
            self.violations.append((self.queued_bytes, self.bound))

    def submit(self, offset: int, data: Data, now: float):  # type: ignore[no-untyped-def]
        ticket = super().submit(offset, data, now)
        if not ticket.acked:
            self.held.set()
        return ticket


class Guest:
    """A guest-like writer on its own thread: ``count`` seeded random writes through
    :class:`NbdClient`, each returning only once acknowledged; the log is in ack order."""

    def __init__(self, sock: Path, size: int, seed: int) -> None:
        self.sock, self.size, self.seed = str(sock), size, seed
        self.log: list[tuple[int, bytes]] = []
        self.elapsed = 0.0

    def run(self, count: int, on_half: threading.Event | None = None) -> None:
        import time

        rnd = random.Random(self.seed)
        with NbdClient.connect(self.sock) as disk:
            t0 = time.monotonic()
            for i in range(count):
                length = rnd.choice([512, 4096, 4096, 16384, 65536, 131072])
                offset = rnd.randrange(0, (self.size - length) // 512) * 512
                data = rnd.randbytes(length)
                disk.pwrite(offset, data)
                self.log.append((offset, data))
                if on_half is not None and i == count // 2:
                    on_half.set()
            self.elapsed = time.monotonic() - t0

    def model(self, initial: bytes) -> bytes:
        disk = bytearray(initial)
        for offset, data in self.log:
            disk[offset:offset + len(data)] = data
        return bytes(disk)


async def test_guest_faster_than_the_link(tmp_path: Path) -> None:
    """The mirror bounds the queue (also after the bound shrinks at run time), slows the
    guest, and after the drain every acknowledged write is on the destination."""
    size = 32 * MiB
    src = make_image(tmp_path / "src.raw", size, seed=21)
    initial = src.pread(0, size)
    dst = RawFileBackend.create(tmp_path / "dst.raw", size)
    bound = 1 * MiB
    with make_stack("tls", tmp_path) as stack:
        async with session_pair(stack, config=LINK) as (a, b):
            sender = DiskSender(a, src, epoch=4, bound=bound, verify=True)
            sender.mirror = mirror = CheckedMirror(bound, 4)
            receiver = DiskReceiver(b, dst, epoch=4, fresh=True, verify=True)
            async with NbdServer(src, sender) as nbd:
                await nbd.start_unix(tmp_path / "nbd.sock")
                await receiver.start()
                await sender.start()
                guest = Guest(tmp_path / "nbd.sock", size, seed=5)
                half = threading.Event()
                writing = asyncio.create_task(asyncio.to_thread(guest.run, 400, half))
                await asyncio.to_thread(half.wait)
                sender.set_bound(256 << 10)  # switchover nears: shrink
                await writing
                # the switchover's way: every queued write handed to the session (no round
                # trip), the destination applies up to that seq; digests kept all along
                last = await sender.seal()
                assert last == sender.mirror.last_seq > 0
                await receiver.wait_applied(last)
                await receiver.flush()
                digests = (await sender.digest(), await receiver.current_digest())
                progress = await sender.drain()
                assert not nbd.errors
            await sender.stop()
            await receiver.stop()
    expected = guest.model(initial)
    assert src.pread(0, size) == expected  # the NBD path wrote exactly what was acked
    assert dst.pread(0, size) == expected  # ...and all of it reached the destination
    assert receiver.digest() == image_digest(src) == digests[0] == digests[1]
    assert mirror.violations == []  # never above the bound in force
    assert progress.mirror_max_queued_bytes <= bound
    assert progress.acks_delayed > 0 and progress.ack_delay_total_s > 0  # the guest was slowed
    assert progress.mirror_writes > 0 and progress.bulk_done
    assert progress.bulk_hole_bytes > 0 and progress.bulk_zero_bytes > 0
    assert progress.mirror_queued_bytes == progress.mirror_held_bytes == 0
    written = sum(len(d) for _, d in guest.log)
    print(f"guest wrote {written / MiB:.1f} MiB in {guest.elapsed:.2f} s "
          f"({written / guest.elapsed / 1e6:.1f} MB/s over a 10 MB/s link); "
          f"{progress.acks_delayed} acks delayed, {progress.ack_delay_total_s:.2f} s total")
    src.close()
    dst.close()


async def test_stale_epoch_is_refused(tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.raw", 4 * MiB, seed=1)
    dst = RawFileBackend.create(tmp_path / "dst.raw", 4 * MiB)
    blank = image_digest(dst)
    with make_stack("tls", tmp_path) as stack:
        async with session_pair(stack) as (a, b):
            receiver = DiskReceiver(b, dst, epoch=8, fresh=True)
            await receiver.start()
            sender = DiskSender(a, src, epoch=7)
            with pytest.raises(StaleEpochError) as info:
                await sender.start()
            assert (info.value.epoch, info.value.current) == (7, 8)
            with pytest.raises(StaleEpochError):
                await receiver.wait()
            await sender.stop()
    assert image_digest(dst) == blank
    src.close()
    dst.close()


async def test_fencing_mid_migration(tmp_path: Path) -> None:
    """The destination moves to a newer epoch while mirroring: the old source's next write
    is refused (nothing of it written), the source stops mirroring, its guest goes on."""
    size = 4 * MiB
    src = make_image(tmp_path / "src.raw", size, seed=2)
    dst = RawFileBackend.create(tmp_path / "dst.raw", size)
    with make_stack("tls", tmp_path) as stack:
        async with session_pair(stack) as (a, b):
            sender = DiskSender(a, src, epoch=3, bound=0)
            receiver = DiskReceiver(b, dst, epoch=3, fresh=True)
            async with NbdServer(src, sender) as nbd:
                await nbd.start_unix(tmp_path / "nbd.sock")
                await receiver.start()
                await sender.start()
                await sender.wait_bulk()
                before = image_digest(dst)
                initial = src.pread(0, size)
                receiver.fence(4)
                guest = Guest(tmp_path / "nbd.sock", size, seed=9)
                await asyncio.to_thread(guest.run, 20)  # every write is acknowledged
                with pytest.raises(StaleEpochError):
                    await sender.drain()
                with pytest.raises(StaleEpochError):
                    await receiver.wait()
            await sender.stop()
    assert image_digest(dst) == before
    assert src.pread(0, size) == guest.model(initial)
    src.close()
    dst.close()


async def test_destination_too_small(tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.raw", 4 * MiB, seed=3)
    dst = RawFileBackend.create(tmp_path / "dst.raw", 4 * MiB - 4096)
    with make_stack("tls", tmp_path) as stack:
        async with session_pair(stack) as (a, b):
            receiver = DiskReceiver(b, dst, epoch=1, fresh=True)
            await receiver.start()
            sender = DiskSender(a, src, epoch=1)
            with pytest.raises(DiskTooSmall):
                await sender.start()
            with pytest.raises(DiskTooSmall):
                await receiver.wait()
            await sender.stop()
    src.close()
    dst.close()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (root only), so the destination really runs out of space (ENOSPC)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_destination_full(tmp_path: Path, small_fs: Path) -> None:
    """ENOSPC on the destination is DiskFull on both sides; the source disk is untouched
    and its guest keeps writing (acknowledged at once, mirroring stopped)."""
    size = 8 * MiB
    src = make_image(tmp_path / "src.raw", size, seed=4, fill=1.0)
    initial = src.pread(0, size)
    before = image_digest(src)
    dst = RawFileBackend.create(small_fs / "dst.raw", size)  # sparse: fits until written
    with make_stack("tls", tmp_path) as stack:
        async with session_pair(stack) as (a, b):
            sender = DiskSender(a, src, epoch=1)
            receiver = DiskReceiver(b, dst, epoch=1, fresh=True)
            async with NbdServer(src, sender) as nbd:
                await nbd.start_unix(tmp_path / "nbd.sock")
                await receiver.start()
                await sender.start()
                with pytest.raises(DiskFull):
                    await sender.drain()
                with pytest.raises(DiskFull):
                    await receiver.wait()
                assert image_digest(src) == before
                guest = Guest(tmp_path / "nbd.sock", size, seed=6)
                await asyncio.to_thread(guest.run, 10)
            await sender.stop()
    assert src.pread(0, size) == guest.model(initial)
    src.close()
    dst.close()


async def test_abort_releases_held_writes(tmp_path: Path) -> None:
    """stop() (abort) acknowledges every held write and lets later ones straight through;
    the source disk holds exactly what the guest wrote."""
    size = 8 * MiB
    src = make_image(tmp_path / "src.raw", size, seed=8)
    initial = src.pread(0, size)
    dst = RawFileBackend.create(tmp_path / "dst.raw", size)
    with make_stack("tls", tmp_path) as stack:
        async with session_pair(stack, config=SessionConfig(rate_cap_bps=8e6)) as (a, b):
            sender = DiskSender(a, src, epoch=1, bound=0)
            sender.mirror = mirror = CheckedMirror(0, 1)
            receiver = DiskReceiver(b, dst, epoch=1, fresh=True)
            async with NbdServer(src, sender) as nbd:
                await nbd.start_unix(tmp_path / "nbd.sock")
                await receiver.start()
                await sender.start()
                guest = Guest(tmp_path / "nbd.sock", size, seed=3)
                writing = asyncio.create_task(asyncio.to_thread(guest.run, 60))
                await mirror.held.wait()
                await sender.stop()
                await writing
            await receiver.stop()
    assert len(guest.log) == 60
    assert src.pread(0, size) == guest.model(initial)
    src.close()
    dst.close()


async def test_writes_held_when_the_guest_stops_are_drained(tmp_path: Path) -> None:
    """The guest stops (paused for the blackout) with writes still held: each is admitted
    as room frees, and sent, though no new write comes to wake the mirror's sender."""
    size = 4 * MiB
    src = make_image(tmp_path / "src.raw", size, seed=12)
    dst = RawFileBackend.create(tmp_path / "dst.raw", size)
    with make_stack("tls", tmp_path) as stack:
        async with session_pair(stack) as (a, b):
            sender = DiskSender(a, src, epoch=1, bound=64 << 10)
            receiver = DiskReceiver(b, dst, epoch=1, fresh=True)
            await receiver.start()
            await sender.start()
            await sender.wait_bulk()  # the whole disk is below the cursor: all mirrored
            rnd = random.Random(12)
            acks = []
            for i in range(8):  # written at once, as a paused guest's in-flight writes
                data = rnd.randbytes(64 << 10)
                src.pwrite(i * (64 << 10), data)
                acks.append(sender.write_nowait(i * (64 << 10), data))
            assert acks[0] is None and all(f is not None for f in acks[1:])  # held
            async with asyncio.timeout(10):
                progress = await sender.drain()
                await receiver.flush()
            assert all(f is None or f.done() for f in acks)
            await sender.stop()
            await receiver.stop()
    assert progress.acks_delayed == 7 and progress.mirror_queued_bytes == 0
    assert dst.pread(0, size) == src.pread(0, size)
    src.close()
    dst.close()
