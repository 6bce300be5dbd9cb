"""xmig.guest: hypervisor backends (see DESIGN.md).

- :mod:`xmig.guest.sim` — the reference guest: a process with shared-memory RAM, a dirty
  log, workloads, a throttle, a virtual disk through a block device, a UDP service, and
  pause / device state / resume into a new process.
- :mod:`xmig.guest.qemu` — a real QEMU guest under TCG driven over QMP, and the test guest
  built from Debian packages (``make guest-image``) whose workload prints a progress counter.
"""
