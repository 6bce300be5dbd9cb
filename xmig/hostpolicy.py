"""What a destination host decides for an arriving guest, from its own configuration.

A source describes its guest (sizes, workload); everything that lands on this host — where
files go, their names, the guest's nice level, the address its service binds — is chosen
here. Resources are checked before anything is made: a guest over the limits is refused
(:class:`~xmig.errors.ResourceLimit`; :class:`~xmig.errors.DiskTooSmall` when the workdir's
filesystem cannot hold its disk).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from xmig.errors import DiskTooSmall, ResourceLimit


@dataclass(frozen=True)
class HostPolicy:
    """An agent's own choices and limits (``xmig agent`` flags)."""

    max_ram_bytes: int | None = None
    """RAM one arriving guest may have; None: the host's available memory at the time."""
    max_disk_bytes: int | None = None
    """Disk one arriving guest may have; None: the workdir's free space at the time."""
    guest_nice: int = 0
    """The nice level of the reference guests this host runs."""
    udp_host: str = "127.0.0.1"
    """Where an arriving reference guest's UDP service binds (its port is picked free)."""
    shm_dir: Path = Path("/dev/shm")
    """Where reference guests' shared RAM files go (mode 0600)."""


DEFAULT_POLICY = HostPolicy()


def available_memory() -> int:
    """The host's available memory in bytes (``MemAvailable`` of /proc/meminfo)."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_space(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def check_resources(policy: HostPolicy, *, ram_bytes: int, disk_bytes: int,
                    workdir: Path) -> None:
    """ResourceLimit (or DiskTooSmall) unless this host may take a guest of ``ram_bytes``
    of RAM and ``disk_bytes`` of disk into ``workdir``; changes nothing."""
    ram_cap = policy.max_ram_bytes
    if ram_cap is None:
        ram_cap = available_memory()
        if ram_bytes > ram_cap:
            raise ResourceLimit(f"the guest's {ram_bytes} bytes of RAM exceed this host's "
                                f"available memory ({ram_cap} bytes)")
    elif ram_bytes > ram_cap:
        raise ResourceLimit(f"the guest's {ram_bytes} bytes of RAM exceed this agent's "
                            f"--max-ram ({ram_cap} bytes)")
    if policy.max_disk_bytes is not None and disk_bytes > policy.max_disk_bytes:
        raise ResourceLimit(f"the guest's {disk_bytes}-byte disk exceeds this agent's "
                            f"--max-disk ({policy.max_disk_bytes} bytes)")
    free = free_space(workdir)
    if disk_bytes > free:
        # the image is sparse, but the copy writes every block the source has
        raise DiskTooSmall(f"the destination's {workdir} has {free} bytes free, the source "
                           f"disk is {disk_bytes} bytes")
