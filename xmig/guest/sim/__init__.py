"""The reference guest: a process that behaves like a VM as far as migration can tell.

Its RAM is a shared memory file filled with a seeded mix of zero, text/code and random pages;
its vCPU runs a workload (idle, uniform, hotset, scan, oltp) that writes pages and marks them
in a dirty log, obeys a throttle, counts progress, writes a virtual disk through a
:class:`BlockDevice` (recording each acknowledged write in a ledger) and answers a UDP
key-value service. It pauses, hands out its device state, and a new process resumes from the
RAM file plus that state::

    src = SimGuest.start(SimConfig(ram_bytes=256 << 20, workload="uniform", rate_Bps=50e6),
                         workdir=tmp)
    dst = SimGuest.start_incoming(src.config, workdir=tmp)
    ...  # pre-copy: src.memory.fetch_and_clear_dirty() / read_pages → dst.memory.write_pages
    src.pause(); dst.load_device_state(src.device_state()); dst.resume(); src.quit()
"""

from xmig.guest.sim.blockdev import (
    BlockDevice,
    FileBlockDevice,
    NbdBlockDevice,
    make_disk_image,
    open_block_device,
)
from xmig.guest.sim.client import DowntimeProbe, ProbeReport, SimClient
from xmig.guest.sim.config import WORKLOADS, DiskUrl, SimConfig
from xmig.guest.sim.devstate import decode_device_state
from xmig.guest.sim.host import Progress, SimGuest, downtime_s
from xmig.guest.sim.ledger import LedgerCheck, LedgerEntry, read_ledger, verify_ledger
from xmig.guest.sim.shm import SharedPaths, SimMemory

__all__ = [
    "WORKLOADS",
    "BlockDevice",
    "DiskUrl",
    "DowntimeProbe",
    "FileBlockDevice",
    "LedgerCheck",
    "LedgerEntry",
    "NbdBlockDevice",
    "ProbeReport",
    "Progress",
    "SharedPaths",
    "SimClient",
    "SimConfig",
    "SimGuest",
    "SimMemory",
    "decode_device_state",
    "downtime_s",
    "make_disk_image",
    "open_block_device",
    "read_ledger",
    "verify_ledger",
]
