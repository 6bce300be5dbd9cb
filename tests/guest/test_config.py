"""Bad configurations are refused before (or when) a guest process starts."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest

from xmig.errors import ConfigError, GuestNotFound
from xmig.guest.sim import DiskUrl, SimConfig, SimGuest, make_disk_image

from .conftest import GuestFactory, MiB, small_config


@pytest.mark.parametrize(
    "fields",
    [
        {"rate_Bps": -1.0},
        {"rate_Bps": math.nan},
        {"disk_rate_Bps": -5.0},
        {"workload": "bitcoin"},
        {"ram_bytes": 16 * MiB + 100},
        {"ram_bytes": 0},
        {"zero_fraction": 0.8, "text_fraction": 0.3},
        {"write_size": 100},
        {"workload": "hotset", "hotset_bytes": 64 * MiB},
        {"hotset_bytes": 0},
        {"table_bytes": 12 * MiB},
        {"workload": "oltp", "disk_rate_Bps": 1e6},  # oltp disk writes without a disk
        {"disk_url": "http://example.com/disk.raw"},
        {"disk_url": "file://relative/path.raw"},
        {"disk_url": "nbd+unix:///export"},
        {"udp_addr": ("127.0.0.1", 70000)},
        {"seed": -1},
        {"workload": "oltp", "oltp_keys": 1 << 20},
    ],
)
def test_bad_config_is_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        small_config(**fields)


def test_disk_urls_parse() -> None:
    assert DiskUrl.parse("file:///var/lib/x.raw") == DiskUrl("file", "/var/lib/x.raw")
    assert DiskUrl.parse("nbd+unix:///?socket=/run/x.sock") == DiskUrl("nbd+unix", "/run/x.sock")
    assert DiskUrl.parse("nbd+unix:///disk0?socket=/s").export == "disk0"


def test_config_round_trips_through_json() -> None:
    config = small_config(udp_addr=("127.0.0.1", 5000), rate_Bps=math.inf, workload="uniform")
    assert SimConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError):
        SimConfig.from_json({"ram_bytes": 16 * MiB, "bogus": 1})


def test_missing_disk_is_not_found(tmp_path: Path) -> None:
    config = small_config(disk_url=f"file://{tmp_path}/absent.raw")
    with pytest.raises(GuestNotFound):
        SimGuest.start(config, workdir=tmp_path)
    nbd = small_config(disk_url=f"nbd+unix:///?socket={tmp_path}/absent.sock")
    with pytest.raises(GuestNotFound):
        SimGuest.start(nbd, workdir=tmp_path)


def test_disk_too_small_for_config_is_refused_by_the_guest(
    tmp_path: Path, guests: GuestFactory
) -> None:
    disk = make_disk_image(tmp_path / "small.raw", 1 * MiB)
    config = small_config(disk_url=f"file://{disk}", disk_bytes=4 * MiB)
    name = f"xmig-sim-test-{os.getpid()}-refused"
    with pytest.raises(ConfigError, match="disk_bytes"):
        guests(config, name=name)
    # nothing left behind (the shared files live in this user's private directory there)
    assert not list(Path(config.shm_dir).glob(f"**/*{name}*"))


def test_missing_ram_file_for_incoming(tmp_path: Path) -> None:
    with pytest.raises(GuestNotFound):
        SimGuest.start_incoming(small_config(), workdir=tmp_path, ram_path=tmp_path / "no.ram")
    wrong = tmp_path / "wrong.ram"
    wrong.write_bytes(b"\0" * 4096)
    with pytest.raises(ConfigError):
        SimGuest.start_incoming(small_config(), workdir=tmp_path, ram_path=wrong)
