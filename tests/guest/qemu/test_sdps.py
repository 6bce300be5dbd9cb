"""SDPS for a QEMU guest (issue 4, section 4): a guest dirtying faster than the link
converges with SDPS (its vCPUs' CPU quota cut until its dirty rate fits the link); without,
it does not (tests/guest/qemu/test_migrate.py: NotConverging, the source runs on).

The link is 200 Mbit/s. This writer dirties 1.3–2 GB/s: 1 % of it (SDPS's floor while the
CPU quota's period was a fixed 100 ms) is 13–20 MB/s, at or past the link, and convergence
was a coin toss (2 failures in 4 clean-clone CI runs); the floor is 0.1 % now.

The writer rewrites whole pages (``mem_fill=1``): dirtying costs the vCPU time, so a CPU
quota slows it. (A writer touching one 64-byte line per page dirties a page per store: even
at a 1 % quota floor it outran the link under TCG; see QemuMigrationOptions.sdps.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from xmig.guest.qemu import QemuGuest
from xmig.guest.qemu.image import GuestImage
from xmig.guest.qemu.migrate import QemuMigrationOptions
from xmig.guest.qemu.throttle import CGROUP_CPU
from xmig.netem import LinkSpec

from .test_migrate import BOOT_S, RUN_S, guest_config, migrate_over_wan

pytestmark = [pytest.mark.root, pytest.mark.qemu, pytest.mark.slow]

LINK = LinkSpec.symmetric(rate_bps=200_000_000, rtt_s=0.05)


async def test_a_guest_outrunning_the_link_converges_with_sdps(
        guest_image: GuestImage, tmp_path: Path) -> None:
    config = guest_config(guest_image, "mem", mem_mb=48, mem_fill=1)
    template = guest_config(guest_image, "mem", name="dst")
    async with await QemuGuest.launch(config, tmp_path / "src") as source:
        first = await source.wait_for_progress(BOOT_S, min_counter=1)
        second = await source.wait_for_progress(10, min_counter=first.counter + 1)
        # its pace before the migration: it outruns the link many times over
        rate_Bps = (second.counter - first.counter) * 4096 / max(
            (second.up_ms - first.up_ms) / 1000, 1e-3)
        m = await migrate_over_wan(tmp_path, source, template, QemuMigrationOptions(
            reply_timeout_s=RUN_S, timeout_s=150, sdps=True), link=LINK)
        try:
            assert rate_Bps > 10 * 200e6 / 8, rate_Bps
            assert m.src.status == "done" and m.dst.status == "running"
            assert m.src.sdps_max_throttle > 0.3
            assert m.after.counter >= m.before.counter
            assert not list(CGROUP_CPU.glob("xmig-src-*"))  # released at switchover
            print(f"\nSDPS: writer {rate_Bps / 1e6:.1f} MB/s, total {m.total_s:.2f} s, "
                  f"max throttle {m.src.sdps_max_throttle:.2f}, paused->resumed "
                  f"{(m.dst.resumed_at - m.src.paused_at) * 1000:.0f} ms")
        finally:
            if m.dst.guest is not None:
                await m.dst.guest.quit()
