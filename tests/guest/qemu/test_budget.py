"""The downtime budget of a QEMU migration, split between QEMU's last pass and the commit."""

from __future__ import annotations

from xmig.guest.qemu.budget import MIN_LIMIT_MS, HASH_Bps, split_budget

MiB = 1 << 20


def test_qemu_gets_the_budget_less_the_commits_round_trips_and_checks() -> None:
    split = split_budget(300, srtt_s=0.05, ram_bytes=128 * MiB)
    hashing_ms = 128 * MiB / HASH_Bps * 1000  # about 67 ms
    assert split.reserve_ms == round(75 + hashing_ms + 20)
    assert split.qemu_limit_ms == 300 - split.reserve_ms and split.fits


def test_an_unmeasured_link_reserves_only_the_checks() -> None:
    split = split_budget(300, srtt_s=None, ram_bytes=0)
    assert (split.reserve_ms, split.qemu_limit_ms, split.fits) == (20, 280, True)


def test_a_budget_under_the_reserve_is_said_not_to_fit() -> None:
    # 300 ms over a 400 ms round trip: the commit alone takes 600 ms
    split = split_budget(300, srtt_s=0.4, ram_bytes=64 * MiB)
    assert not split.fits and split.qemu_limit_ms == MIN_LIMIT_MS
    assert split.reserve_ms > 600
