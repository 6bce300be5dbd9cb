"""The reference guest's configuration and the disk URLs it accepts.

A :class:`SimConfig` is validated when it is built (bad values raise :class:`ConfigError`),
so a guest process is never started from an impossible configuration. It travels to the
guest process as JSON (:meth:`SimConfig.to_json`).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from xmig.errors import ConfigError
from xmig.memory.guest import PAGE_SIZE

WORKLOADS = ("idle", "uniform", "hotset", "scan", "oltp")
"""Workload names: see :mod:`xmig.guest.sim.workloads`."""

MiB = 1 << 20
TABLE_SLOT_BYTES = 256
MIN_RAM_BYTES = 1 * MiB
MIN_OLTP_DISK_BYTES = 2 * MiB


@dataclass(frozen=True)
class DiskUrl:
    """A parsed disk URL: ``file:///abs/path.raw`` or ``nbd+unix:///[export]?socket=/p.sock``."""

    scheme: str
    path: str
    """The image file (``file``) or the NBD server's Unix socket (``nbd+unix``)."""
    export: str = ""

    @classmethod
    def parse(cls, url: str) -> DiskUrl:
        parts = urlsplit(url)
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
                raise ConfigError(f"disk URL {url!r}: want file:///absolute/path")
            return cls("file", parts.path)
        if parts.scheme == "nbd+unix":
            sockets = parse_qs(parts.query).get("socket", [])
            if len(sockets) != 1 or not sockets[0].startswith("/"):
                raise ConfigError(f"disk URL {url!r}: want nbd+unix:///?socket=/absolute.sock")
            return cls("nbd+unix", sockets[0], parts.path.lstrip("/"))
        raise ConfigError(f"disk URL {url!r}: scheme must be file or nbd+unix")


@dataclass(frozen=True)
class SimConfig:
    """Everything that defines one reference guest. Sizes in bytes, rates in bytes per second
    (``math.inf`` = as fast as one process can).

    ``rate_Bps`` is the page-write rate of the workload (every write counts, repeated or
    not); ``disk_rate_Bps`` the disk-write rate of ``oltp``. ``write_size`` bytes of a page
    change on each page write (the rest of the page stays, as in a real guest). The
    key-value table takes the last ``table_bytes`` of RAM; workloads never write there
    except through the table.
    """

    ram_bytes: int = 256 * MiB
    disk_url: str | None = None
    disk_bytes: int = 0
    """Bytes of the disk the guest uses; 0 = the whole device. Larger than the device: error."""
    workload: str = "idle"
    rate_Bps: float = 0.0
    hotset_bytes: int = 16 * MiB
    seed: int = 0
    udp_addr: tuple[str, int] | None = None
    zero_fraction: float = 0.4
    text_fraction: float = 0.3
    """Pages filled with text and code read from files on this machine; the rest is random."""
    write_size: int = 256
    disk_rate_Bps: float = 0.0
    table_bytes: int = 4 * MiB
    oltp_keys: int = 4096
    disk_queue_depth: int = 32
    """Disk requests the vCPU may have outstanding (0: it waits for each, synchronously)."""
    nice: int = 0
    """The guest process's scheduling priority (−20…19; below 0 needs root). On one box that
    also runs both agents and the link emulator, a negative value stands for the dedicated
    CPUs a VM's vCPUs have on a real host, away from the migration's threads."""
    ledger_path: str | None = None
    """Append-only log of acknowledged disk writes; None = ``<workdir>/<guest name>.ledger``."""
    shm_dir: str = "/dev/shm"

    def __post_init__(self) -> None:
        if isinstance(self.udp_addr, list):  # from JSON
            object.__setattr__(self, "udp_addr", (str(self.udp_addr[0]), int(self.udp_addr[1])))
        self._validate()

    @property
    def page_count(self) -> int:
        return self.ram_bytes // PAGE_SIZE

    @property
    def table_pages(self) -> int:
        return self.table_bytes // PAGE_SIZE

    @property
    def data_pages(self) -> int:
        """Pages the page workloads write: all but the table's."""
        return self.page_count - self.table_pages

    @property
    def disk(self) -> DiskUrl | None:
        return DiskUrl.parse(self.disk_url) if self.disk_url else None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SimConfig:
        try:
            return cls(**data)
        except TypeError as err:
            raise ConfigError(f"bad guest configuration: {err}") from err

    def _validate(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"guest config: {what}")

        need(isinstance(self.ram_bytes, int), "ram_bytes must be an integer")
        need(self.ram_bytes >= MIN_RAM_BYTES, f"ram_bytes must be at least {MIN_RAM_BYTES}")
        need(self.ram_bytes % PAGE_SIZE == 0, f"ram_bytes must be a multiple of {PAGE_SIZE}")
        need(self.workload in WORKLOADS, f"workload {self.workload!r} not one of {WORKLOADS}")
        for name in ("rate_Bps", "disk_rate_Bps"):
            value = getattr(self, name)
            need(isinstance(value, int | float) and not math.isnan(value), f"{name} is NaN")
            need(value >= 0, f"{name} must be >= 0, not {value}")
        need(self.table_bytes % PAGE_SIZE == 0 and self.table_bytes >= PAGE_SIZE,
             f"table_bytes must be a positive multiple of {PAGE_SIZE}")
        need(self.table_bytes <= self.ram_bytes // 2, "table_bytes must be at most half the RAM")
        need(self.hotset_bytes > 0 and self.hotset_bytes % PAGE_SIZE == 0,
             f"hotset_bytes must be a positive multiple of {PAGE_SIZE}")
        if self.workload in ("hotset", "oltp"):
            need(self.hotset_bytes <= self.data_pages * PAGE_SIZE,
                 "hotset_bytes larger than the RAM outside the key-value table")
        need(0 <= self.zero_fraction <= 1 and 0 <= self.text_fraction <= 1
             and self.zero_fraction + self.text_fraction <= 1,
             "zero_fraction and text_fraction must be in [0, 1] and sum to at most 1")
        need(self.write_size in {1 << k for k in range(3, 13)},
             "write_size must be a power of two from 8 to 4096")
        need(isinstance(self.seed, int) and 0 <= self.seed < 2**63, "seed must be in [0, 2**63)")
        if self.workload == "oltp":
            need(0 < self.oltp_keys <= self.table_bytes // TABLE_SLOT_BYTES // 2,
                 "oltp_keys must be positive and fill at most half the table")
        need(self.disk_bytes >= 0 and self.disk_bytes % PAGE_SIZE == 0,
             f"disk_bytes must be a non-negative multiple of {PAGE_SIZE}")
        disk = self.disk  # parses (ConfigError on a bad URL)
        if self.workload == "oltp" and self.disk_rate_Bps > 0:
            need(disk is not None, "oltp with disk_rate_Bps > 0 needs a disk_url")
            need(self.disk_bytes == 0 or self.disk_bytes >= MIN_OLTP_DISK_BYTES,
                 f"oltp needs a disk of at least {MIN_OLTP_DISK_BYTES} bytes")
        if self.udp_addr is not None:
            host, port = self.udp_addr
            need(isinstance(host, str) and isinstance(port, int) and 0 <= port < 65536,
                 f"udp_addr {self.udp_addr!r} must be (host, port)")
        need(os.path.isabs(self.shm_dir), "shm_dir must be an absolute path")
        need(isinstance(self.nice, int) and -20 <= self.nice <= 19, "nice must be in -20..19")
        need(isinstance(self.disk_queue_depth, int) and 0 <= self.disk_queue_depth <= 1024,
             "disk_queue_depth must be in 0..1024")
