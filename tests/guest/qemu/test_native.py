"""QEMU's own migration driven the libvirt way (:mod:`xmig.guest.qemu.native`), the baseline
of ``bench/vs_qemu.py``: the disk mirrored into the destination's NBD export, RAM over
QEMU's TCP stream, both across the emulated link; it completes and the source ends paused."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from xmig.guest.qemu import QemuConfig, QemuGuest
from xmig.guest.qemu.image import GuestImage, guest_cmdline
from xmig.guest.qemu.native import NativeOptions, migrate_native
from xmig.netem import LinkSpec, Wan

pytestmark = [pytest.mark.root, pytest.mark.qemu, pytest.mark.slow]

LINK = LinkSpec.symmetric(rate_bps=100_000_000, rtt_s=0.02)
DISK = 16 << 20


async def test_native_migration_completes_and_the_source_ends_paused(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    (tmp_path / "src").mkdir()
    disk = tmp_path / "src" / "disk.raw"
    disk.touch()
    os.truncate(disk, DISK)
    # a record every 80 ms, longer than a round trip: the background mirror becomes READY
    # only when no chunk is dirty and no copy is in flight (bench/README.md, vs_qemu.py)
    append = guest_cmdline("memdisk", report_ms=100, mem_mb=16, mem_rate=2, disk_rate=0.05)
    config = QemuConfig(kernel=guest_image.kernel, initrd=guest_image.initrd, disk=disk,
                        ram_mb=128, name="src", append=append)
    with Wan(LINK) as wan:
        async with await QemuGuest.launch(config, tmp_path / "src",
                                          popen=functools.partial(wan.popen, "src")) as source:
            await source.wait_for_progress(60, min_counter=1)
            result = await migrate_native(
                source, QemuConfig(kernel=guest_image.kernel, initrd=guest_image.initrd,
                                   ram_mb=128, name="dst", append=append),
                dst_addr=wan.dst_addr, workdir=tmp_path / "dst",
                popen=functools.partial(wan.popen, "dst"),
                options=NativeOptions(max_bandwidth_Bps=LINK.rate_bps // 8 if LINK.rate_bps
                                      else None, timeout_s=40))
            try:
                assert result.converged and result.status == "completed", result.error
                assert await source.status() == "postmigrate"
                assert result.destination is not None
                assert await result.destination.status() == "running"
                assert result.qemu_info.get("status") == "completed"
                assert 0 < result.paused_at < result.completed_at < result.resumed_at
                print(f"\nmirror ready {result.mirror_ready_at - result.started:.2f} s, "
                      f"total {result.resumed_at - result.started:.2f} s, paused->running "
                      f"{(result.resumed_at - result.paused_at) * 1000:.0f} ms, steps "
                      f"{result.steps_ms}, QEMU downtime {result.qemu_info.get('downtime')}")
            finally:
                if result.destination is not None:
                    await result.destination.quit()
