"""The guest's virtual disk: block devices, oltp's acknowledged writes and the ledger."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from xmig.errors import GuestError, GuestNotFound
from xmig.guest.sim import (
    FileBlockDevice,
    NbdBlockDevice,
    SimGuest,
    make_disk_image,
    read_ledger,
    verify_ledger,
)
from xmig.guest.sim.ledger import LedgerEntry

from .conftest import GuestFactory, MiB, small_config
from .helpers import migrate


def oltp_on(disk: Path, **fields: object) -> dict[str, object]:
    return {"workload": "oltp", "rate_Bps": 2e6, "disk_rate_Bps": 4e6,
            "disk_url": f"file://{disk}", **fields}


def test_file_block_device(tmp_path: Path) -> None:
    path = make_disk_image(tmp_path / "d.raw", 1 * MiB)
    assert path.stat().st_blocks == 0  # sparse
    device = FileBlockDevice(path)
    try:
        assert device.size == 1 * MiB
        device.pwrite(4096, b"abc" * 100)
        device.flush()
        assert device.pread(4096, 300) == b"abc" * 100
        assert device.pread(0, 4) == bytes(4)
        with pytest.raises(GuestError):
            device.pwrite(1 * MiB - 1, b"xy")
    finally:
        device.close()
    with pytest.raises(GuestNotFound):
        FileBlockDevice(tmp_path / "missing.raw")
    with pytest.raises(GuestNotFound):
        NbdBlockDevice(tmp_path / "missing.sock")


def test_oltp_acknowledged_writes_are_in_the_ledger_and_on_disk(
    tmp_path: Path, guests: GuestFactory
) -> None:
    disk = make_disk_image(tmp_path / "disk.raw", 8 * MiB)
    guest = guests(small_config(**oltp_on(disk)))
    guest.wait_until(lambda p: p.disk_writes >= 200, timeout=10)
    guest.pause()
    progress = guest.progress()
    entries = read_ledger(guest.ledger_path)
    assert len(entries) == progress.disk_writes
    assert [e.seq for e in entries] == list(range(len(entries)))
    assert sum(e.length for e in entries) == progress.disk_write_bytes
    assert progress.disk_reads > 0
    device = FileBlockDevice(disk)
    try:
        check = verify_ledger(entries, device.pread)
        assert check.ok and check.verified > 100
        assert check.verified + check.superseded == check.acknowledged
        # the verifier has teeth: lose the newest write that nothing overwrote
        newest = max((e for e in entries), key=lambda e: e.seq)
        device.pwrite(newest.offset, bytes(newest.length))
        lost = verify_ledger(entries, device.pread)
        assert lost.lost == [newest]
    finally:
        device.close()


def test_ledger_verification_skips_overwritten_writes() -> None:
    disk = bytearray(16384)
    disk[0:4096] = b"n" * 4096
    import xxhash

    def entry(seq: int, offset: int, data: bytes) -> LedgerEntry:
        return LedgerEntry(seq, offset, len(data), xxhash.xxh3_64_intdigest(data))

    entries = [entry(0, 0, b"o" * 8192), entry(1, 0, b"n" * 4096)]
    check = verify_ledger(entries, lambda off, n: bytes(disk[off : off + n]))
    assert check.ok and check.verified == 1 and check.superseded == 1


def test_disk_writes_continue_across_a_migration(tmp_path: Path, guests: GuestFactory) -> None:
    """Source and destination on one image (the storage engine's copy is another test's
    business): the write sequence continues, and both ledgers together check out."""
    disk = make_disk_image(tmp_path / "disk.raw", 8 * MiB)
    config = small_config(**oltp_on(disk))
    source = guests(config)
    destination = guests(config, incoming=True)
    source.wait_until(lambda p: p.disk_writes >= 50, timeout=10)
    migrate(source, destination)
    destination.wait_until(lambda p: p.disk_writes >= source.progress().disk_writes + 50,
                           timeout=10)
    destination.pause()
    before, after = read_ledger(source.ledger_path), read_ledger(destination.ledger_path)
    assert after[0].seq == before[-1].seq + 1
    device = FileBlockDevice(disk)
    try:
        assert verify_ledger(before + after, device.pread).ok
    finally:
        device.close()


async def test_oltp_disk_through_xmig_nbd_server(tmp_path: Path) -> None:
    """The guest's disk served by xmig's NBD server: every acknowledged write passed the
    server's write hook and is in the image."""
    nbd = pytest.importorskip("xmig.storage.nbd")
    raw = pytest.importorskip("xmig.storage.raw")
    seen: list[tuple[int, int]] = []

    class Hook:
        async def on_write(self, offset: int, data: bytes) -> None:
            seen.append((offset, len(data)))

    image = raw.RawFileBackend.create(tmp_path / "disk.raw", 8 * MiB)
    server = nbd.NbdServer(image, Hook())
    sock = tmp_path / "nbd.sock"
    await server.start_unix(str(sock))
    config = small_config(workload="oltp", rate_Bps=2e6, disk_rate_Bps=4e6,
                          disk_url=f"nbd+unix:///?socket={sock}")
    guest = await asyncio.to_thread(SimGuest.start, config, workdir=tmp_path)
    try:
        await asyncio.to_thread(guest.wait_until, lambda p: p.disk_writes >= 100, 10)
        await asyncio.to_thread(guest.pause)
        entries = read_ledger(guest.ledger_path)
        assert len(entries) == guest.progress().disk_writes >= 100
        assert {(e.offset, e.length) for e in entries} <= set(seen)
        assert verify_ledger(entries, image.pread).ok
    finally:
        await asyncio.to_thread(guest.quit)
        await server.close()
        image.close()
