"""QEMU processes an earlier host process started and left running.

A host (an agent) killed with ``kill -9`` does not take its QEMU children with it: a QEMU
that was receiving, or holding a received guest paused in doubt, runs on with nobody
driving it. When the agent restarts on its work directory it abandons those migrations
(:mod:`xmig.orchestrator.recovery`); :func:`reap` first stops the QEMU that held each one,
found by the pidfile every QEMU started by :class:`~xmig.guest.qemu.machine.QemuGuest`
writes in its work directory (``NAME.pid``). A guest that *runs* is never reaped: the agent
calls this only for directories whose migration it abandons or discards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
from pathlib import Path

log = logging.getLogger(__name__)

#: how long a killed QEMU may take to exit (it holds no lock that delays SIGKILL)
EXIT_TIMEOUT_S = 10.0


def reap(workdir: Path, *, timeout: float = EXIT_TIMEOUT_S) -> list[int]:
    """Kill (SIGKILL) every QEMU whose pidfile is in ``workdir`` and that still runs, and
    wait until each has exited; returns their pids. A pid whose command line does not name
    its pidfile (it exited; the pid was reused) is left alone. Pidfiles are removed."""
    reaped = []
    for pidfile in sorted(workdir.glob("*.pid")):
        pid = _read_pid(pidfile)
        if pid is not None and _kill_and_wait(pid, pidfile, timeout):
            log.info("%s: killed QEMU pid %d left running by an earlier process", pidfile, pid)
            reaped.append(pid)
        pidfile.unlink(missing_ok=True)
    return reaped


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _kill_and_wait(pid: int, pidfile: Path, timeout: float) -> bool:
    try:
        fd = os.pidfd_open(pid)  # from here the pid cannot be reused under us
    except OSError:  # gone
        return False
    try:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        if str(pidfile).encode() not in argv:
            return False
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        readable, _, _ = select.select([fd], [], [], timeout)  # readable once it exited
        if not readable:
            log.warning("QEMU pid %d did not exit within %g s of SIGKILL", pid, timeout)
        return True
    finally:
        os.close(fd)
