"""Through the TUN WAN emulator: a guest whose disk writes outrun the link does not starve
the bulk copy. The mirror shares the link by weight with the bulk copy (2 : 1, see
:mod:`xmig.transport.channels`); its own congestion control keeps it bounded."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from tests.storage.conftest import MiB
from tests.storage.test_engine import CheckedMirror
from tests.transport.stacks import Stack, session_pair
from xmig.netem import LinkSpec, Wan
from xmig.storage.apply import image_digest
from xmig.storage.engine import DiskReceiver, DiskSender
from xmig.storage.raw import RawFileBackend
from xmig.transport import Channel
from xmig.transport.certs import init_pki

pytestmark = pytest.mark.root

LINK_BPS = 50_000_000
SIZE = 8 * MiB  #: all of it random data: the bulk copy sends every byte
BOUND = 8 * MiB
WRITE = 64 << 10
WEIGHTS = {Channel.DISK_MIRROR: 2, Channel.DISK_BULK: 1}  # memory idle here
FACTOR = 2.0  #: the deadline is the bulk copy's time at its weighted share, times this


class Writer:
    """A guest disk writer: sequential 64 KiB writes of seeded random data, wrapping, below
    the bulk cursor (so all of it is mirrored), paced at ``rate`` bytes/s; each write goes
    to the local disk, then through the sender's hook, and the next waits for its ack."""

    def __init__(self, sender: DiskSender, disk: RawFileBackend, rate: float, seed: int):
        self.sender, self.disk, self.rate = sender, disk, rate
        self.rng = np.random.default_rng(seed)
        self.written = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        offset = 0
        while True:
            if (delay := due - loop.time()) > 0:
                await asyncio.sleep(delay)  # pacing, not waiting for a condition
            due += WRITE / self.rate
            limit = max(self.sender.mirror.cursor, WRITE)  # cursor 0: bulk will copy it
            if offset + WRITE > limit:
                offset = 0
            data = self.rng.bytes(WRITE)
            self.disk.pwrite(offset, data)  # as the NBD server does: local disk first
            ack = self.sender.write_nowait(offset, data)
            if ack is not None:
                await ack  # held: the mirror's congestion control slows us
            self.written += WRITE
            offset += WRITE


async def test_mirror_at_twice_the_link_rate_does_not_starve_the_bulk_copy(
    tmp_path: Path,
) -> None:
    spec = LinkSpec.symmetric(rate_bps=LINK_BPS, rtt_s=0.02)
    src = RawFileBackend.create(tmp_path / "src.raw", SIZE)
    src.pwrite(0, np.random.default_rng(3).bytes(SIZE))
    dst = RawFileBackend.create(tmp_path / "dst.raw", SIZE)
    link_Bps = LINK_BPS / 8
    bulk_share = WEIGHTS[Channel.DISK_BULK] / sum(WEIGHTS.values())
    deadline = SIZE / (link_Bps * bulk_share) * FACTOR  # ~8 s; strict priority: never
    with Wan(spec, fallback="tun") as wan:
        stack = Stack("tls-netem", init_pki(tmp_path / "pki", server_names=(wan.dst_addr,)), wan)
        async with session_pair(stack) as (a, b):
            sender = DiskSender(a, src, epoch=1, bound=BOUND)
            sender.mirror = mirror = CheckedMirror(BOUND, 1)
            receiver = DiskReceiver(b, dst, epoch=1, fresh=True)
            await receiver.start()
            await sender.start()
            writer = Writer(sender, src, rate=2 * link_Bps, seed=7)
            t0 = time.monotonic()
            writing = asyncio.create_task(writer.run())
            try:
                async with asyncio.timeout(deadline):
                    await mirror.held.wait()  # the mirror is full: the guest is held
                    got = b.session.recv_channels  # what crossed the link
                    t1 = time.monotonic()
                    before = {ch: got[ch].received_bytes for ch in WEIGHTS}
                    await sender.wait_bulk()
            except TimeoutError:
                p = sender.progress()
                pytest.fail(f"bulk copy not done in {deadline:.1f} s: {p.bulk_applied / MiB:.2f}"
                            f" of {SIZE / MiB:.0f} MiB applied, while the mirror sent "
                            f"{p.mirror_bytes_sent / MiB:.1f} MiB")
            else:
                bulk_s = time.monotonic() - t0
                after = {ch: got[ch].received_bytes for ch in WEIGHTS}
                contended_s = time.monotonic() - t1
            finally:
                writing.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await writing
            async with asyncio.timeout(30):
                progress = await sender.drain()
                await receiver.flush()
            await sender.stop()
            await receiver.stop()

    moved = {ch: after[ch] - before[ch] for ch in WEIGHTS}
    shares = {ch: n / sum(moved.values()) for ch, n in moved.items()}
    print(f"bulk copy of {SIZE / MiB:.0f} MiB in {bulk_s:.2f} s (deadline {deadline:.1f} s); "
          f"guest wrote {writer.written / MiB:.1f} MiB ({writer.written / bulk_s / 1e6:.2f} "
          f"MB/s offered {2 * link_Bps / 1e6:.2f}); while both were backlogged "
          f"({contended_s:.2f} s): mirror {shares[Channel.DISK_MIRROR]:.3f}, bulk "
          f"{shares[Channel.DISK_BULK]:.3f} of {sum(moved.values()) / contended_s / 1e6:.2f} "
          f"MB/s; acks delayed {progress.acks_delayed}, max queued "
          f"{progress.mirror_max_queued_bytes / MiB:.2f} MiB (bound {BOUND / MiB:.0f})")
    assert progress.bulk_done and progress.bulk_data_bytes == SIZE
    # the mirror really outran the link: the guest was held, and took most of the link
    assert progress.acks_delayed > 0 and progress.mirror_bytes_sent > SIZE // 2
    # by weight, 2/3 and 1/3 (coarse: the bulk copy moves in 1 MiB frames, 8 of them)
    assert shares[Channel.DISK_MIRROR] == pytest.approx(2 / 3, abs=0.15)
    assert shares[Channel.DISK_BULK] == pytest.approx(1 / 3, abs=0.15)
    assert mirror.violations == []  # never above the bound
    assert progress.mirror_max_queued_bytes <= BOUND
    assert progress.mirror_queued_bytes == progress.mirror_held_bytes == 0
    assert dst.pread(0, SIZE) == src.pread(0, SIZE)
    assert receiver.digest() == image_digest(src)
    src.close()
    dst.close()
