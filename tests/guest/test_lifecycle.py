"""A guest's process and files: gone on quit, and gone when its host dies."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from xmig.guest.sim import SimGuest

from .conftest import GuestFactory, small_config


def wait_exit(pid: int, timeout: float) -> bool:
    """True once process ``pid`` (not necessarily our child) has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def test_quit_stops_the_process_and_removes_its_files(guests: GuestFactory) -> None:
    guest = guests(small_config(workload="uniform", rate_Bps=1e6))
    files = [guest.paths.ram, guest.paths.dirty, guest.paths.control]
    assert all(path.exists() for path in files)
    guest.quit()
    assert guest.process.returncode == 0
    assert not any(path.exists() for path in files)
    guest.quit()  # idempotent


def test_quit_can_keep_the_files(guests: GuestFactory) -> None:
    guest = guests(small_config(), paused=True)
    digest = guest.digest()
    guest.quit(keep_files=True)
    try:
        restarted = guests(small_config(), incoming=True, ram_path=guest.paths.ram)
        assert restarted.digest() == digest
    finally:
        for path in (guest.paths.ram, guest.paths.dirty, guest.paths.control):
            path.unlink(missing_ok=True)


def test_guest_outlives_the_thread_that_started_it(guests: GuestFactory, tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG fires when the starting *thread* exits; the guest must not die then."""
    started: list[SimGuest] = []
    thread = threading.Thread(
        target=lambda: started.append(SimGuest.start(small_config(), workdir=tmp_path))
    )
    thread.start()
    thread.join()
    guest = started[0]
    try:
        assert not wait_exit(guest.pid, 0.3)
        guest.pause()
        assert guest.paused
    finally:
        guest.quit()


HOST = textwrap.dedent(
    """
    import json, subprocess, sys
    from pathlib import Path
    from xmig.guest.sim import SimConfig, SimGuest
    config = SimConfig(ram_bytes=16 << 20, table_bytes=1 << 20, hotset_bytes=1 << 20,
                       workload="uniform", rate_Bps=5e6)
    guest = SimGuest.start(config, workdir=Path(sys.argv[1]))
    holder = None
    if sys.argv[2] == "hold-channel":  # keep the control channel open past our death
        fd = guest._sock.fileno()
        holder = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"],
                                  stdin=subprocess.DEVNULL, pass_fds=[fd])
    print(json.dumps({"pid": guest.pid, "holder": holder.pid if holder else 0, "files":
          [str(p) for p in (guest.paths.ram, guest.paths.dirty, guest.paths.control)]}),
          flush=True)
    sys.stdin.read()
    """
)


@pytest.mark.parametrize("how", ["close-channel", "hold-channel"])
def test_guest_dies_with_its_host(how: str, tmp_path: Path) -> None:
    """SIGKILL the host: the guest sees end of file on its control channel and, even when
    another process holds that channel open, gets its parent-death signal."""
    host = subprocess.Popen([sys.executable, "-c", HOST, str(tmp_path), how],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    holder = 0
    try:
        assert host.stdout is not None
        started = json.loads(host.stdout.readline())
        holder = started["holder"]
        files = [Path(f) for f in started["files"]]
        assert all(f.exists() for f in files)
        host.send_signal(signal.SIGKILL)
        host.wait()
        assert wait_exit(started["pid"], 10.0)
        assert not any(f.exists() for f in files)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        if holder:
            os.kill(holder, signal.SIGKILL)
