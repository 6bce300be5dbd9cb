"""The QEMU test guest's parts that need no QEMU: command line, progress lines, disk records,
the initramfs's contents, and the build cache."""

from __future__ import annotations

import gzip
import json
import lzma
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import zstandard

from xmig.errors import ConfigError
from xmig.guest.qemu import check_records, parse_progress, record_bytes
from xmig.guest.qemu.image import (
    MODULES,
    GuestImage,
    _decompress,
    build_test_guest,
    guest_cmdline,
)
from xmig.guest.qemu.progress import SerialTail, parse_error

from .helpers import guest_build_dir


def test_cmdline_names_workload_and_params() -> None:
    line = guest_cmdline("memdisk", mem_mb=64, disk_rate=1.5)
    assert line.split() == [
        "console=ttyS0", "quiet", "panic=-1",
        "xmig.workload=memdisk", "xmig.mem_mb=64", "xmig.disk_rate=1.5",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("workload", "params"),
    [("bogus", {}), ("mem", {"mem_mb": "6 4"}), ("mem", {"Mem-MB": 1}), ("mem", {"x": ""})],
)
def test_cmdline_rejects_bad_input(workload: str, params: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        guest_cmdline(workload, **params)


def test_progress_line_parses_and_rates() -> None:
    a = parse_progress(b"XMIG counter=10 up_ms=1000 mem_pass=1 mem_pages=256 disk_seq=4 cpu=0\r")
    b = parse_progress(b"junk XMIG counter=30 up_ms=1500 mem_pass=2 mem_pages=512 disk_seq=9 cpu=0")
    assert a is not None and b is not None
    assert (b.counter, b.mem_pass, b.disk_seq) == (30, 2, 9)
    rates = b.rates(a)
    assert rates["counter_s"] == 40.0
    assert rates["mem_MiB_s"] == 2.0  # 256 pages of 4 KiB in 0.5 s
    assert rates["disk_records_s"] == 10.0
    assert parse_progress(b"XMIG init uptime=2.5") is None
    assert parse_error(b"XMIG error open /dev/vda") == "open /dev/vda"


def test_serial_tail_keeps_partial_lines(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    tail = SerialTail(log)
    assert tail.read_lines() == []
    log.write_bytes(b"one\r\ntw")
    assert tail.read_lines() == [b"one"]
    with open(log, "ab") as f:
        f.write(b"o\nthree")
    assert tail.read_lines() == [b"two"]


def test_records_check_finds_lost_torn_and_wrapped_records(tmp_path: Path) -> None:
    bs, slots = 1024, 8
    disk = tmp_path / "disk.raw"
    image = bytearray(bs * slots)
    for seq in range(11):  # records 8, 9, 10 overwrite slots 0, 1, 2
        image[(seq % slots) * bs : (seq % slots + 1) * bs] = record_bytes(seq, bs)
    disk.write_bytes(image)
    good = check_records(disk, 11, bs)
    assert good.ok and good.checked == 8 and good.first == 3 and good.newest == 10
    assert check_records(disk, 9, bs).ok  # slot 0 holds a newer record: still fine
    image[5 * bs + 700] ^= 1  # a torn record 5
    image[6 * bs : 7 * bs] = bytes(bs)  # a lost record 6
    disk.write_bytes(image)
    bad = check_records(disk, 11, bs)
    assert not bad.ok and bad.bad == (5, 6)
    assert record_bytes(3, 512)[:8] == b"XMIGREC1"


def test_image_is_cached_and_holds_what_init_needs(guest_image: GuestImage) -> None:
    again = build_test_guest(guest_build_dir())
    assert again.cached and again.build_s < 5
    assert again.kernel == guest_image.kernel and again.kernel.stat().st_size > 4 << 20
    assert guest_image.kernel_release.endswith("amd64")
    assert guest_image.kernel_package == f"linux-image-{guest_image.kernel_release}"
    listing = subprocess.run(
        ["busybox", "cpio", "-t"],
        input=gzip.decompress(guest_image.initrd.read_bytes()),
        capture_output=True,
        check=True,
    ).stdout.decode()
    names = set(listing.split())
    assert {"init", "bin/busybox", "bin/sh", "bin/xmig-workload", "dev/console"} <= names
    assert {f"lib/modules/{m}.ko" for m in MODULES} <= names


def test_a_changed_input_rebuilds_the_same_bytes(guest_image: GuestImage, tmp_path: Path) -> None:
    """A manifest whose inputs differ (as after an edit of init.sh) is rebuilt, from the
    downloaded package already there; the build is reproducible (same initramfs bytes)."""
    build = tmp_path / "guest"
    shutil.copytree(guest_image.kernel.parent, build, ignore=shutil.ignore_patterns(".lock"))
    manifest = json.loads((build / "manifest.json").read_text())
    manifest["init_sha256"] = "0" * 64
    (build / "manifest.json").write_text(json.dumps(manifest))
    rebuilt = build_test_guest(build)
    assert not rebuilt.cached
    assert rebuilt.manifest["init_sha256"] == guest_image.manifest["init_sha256"]
    assert rebuilt.initrd.read_bytes() == guest_image.initrd.read_bytes()
    assert rebuilt.kernel.read_bytes() == guest_image.kernel.read_bytes()
    assert build_test_guest(build).cached


@pytest.mark.parametrize("suffix", ["", ".xz", ".zst", ".gz"])
def test_compressed_modules_are_unpacked(suffix: str) -> None:
    ko = b"\x7fELF module" * 100
    packed = {
        "": ko,
        ".xz": lzma.compress(ko),
        ".zst": zstandard.ZstdCompressor().compress(ko),
        ".gz": gzip.compress(ko),
    }[suffix]
    assert _decompress(packed, suffix) == ko
