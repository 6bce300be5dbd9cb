"""xmig.guest.qemu: a real QEMU guest under TCG, driven over QMP.

- :mod:`xmig.guest.qemu.image` builds the test guest from Debian packages (kernel, busybox
  initramfs, a static C workload chosen on the kernel command line), cached in a build folder
  (not imported here: ``python -m xmig.guest.qemu.image BUILD_DIR`` runs it).
- :mod:`~xmig.guest.qemu.machine` starts QEMU (shared-file RAM, virtio-blk disk, QMP socket,
  serial console to a file) and drives it: status, stop, cont, quit, progress from the console.
- :mod:`~xmig.guest.qemu.progress` parses the workload's progress lines;
  :mod:`~xmig.guest.qemu.records` checks the disk records it writes.
- Migration (imported from their modules): :mod:`~xmig.guest.qemu.migrate` (the source and
  destination agents' sides, the commit protocol), :mod:`~xmig.guest.qemu.stream` (QEMU's
  migration stream on the session, max-bandwidth from the delivery rate),
  :mod:`~xmig.guest.qemu.mirror` (the disk through ``blockdev-mirror`` into xmig's NBD
  server), :mod:`~xmig.guest.qemu.ramcheck` (RAM digests at READY, repair before GO),
  :mod:`~xmig.guest.qemu.throttle` (SDPS through the vCPU threads' CPU quota),
  :mod:`~xmig.guest.qemu.attach` (a running QEMU taken by its QMP socket, checked).
"""

from xmig.guest.qemu.machine import QemuConfig, QemuGuest
from xmig.guest.qemu.progress import Progress, parse_progress
from xmig.guest.qemu.records import RecordCheck, check_records, record_bytes

__all__ = [
    "Progress",
    "QemuConfig",
    "QemuGuest",
    "RecordCheck",
    "check_records",
    "parse_progress",
    "record_bytes",
]
