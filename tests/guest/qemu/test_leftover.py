"""xmig.guest.qemu.leftover: the processes a killed host left running in a work directory,
found by their pidfiles. Real processes stand in for QEMU here (any program whose command
line names its pidfile, as QEMU's ``-pidfile`` does); the QEMU agent restart test kills a
real agent and its QEMU (``tests/guest/qemu/test_restart.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from xmig.guest.qemu import leftover


def _orphan(pidfile: Path) -> subprocess.Popen[bytes]:
    """A process that waits for ever and names ``pidfile`` on its command line, running
    (it said so: before its exec its command line is still this test's), its pid written
    there as QEMU writes its own."""
    proc = subprocess.Popen([sys.executable, "-c", "print(flush=True); input()",
                             str(pidfile)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"\n"
    pidfile.write_text(f"{proc.pid}\n")
    return proc


def test_reap_kills_what_names_its_pidfile_and_waits_until_it_exited(tmp_path: Path) -> None:
    proc = _orphan(tmp_path / "guest.pid")
    try:
        assert leftover.reap(tmp_path) == [proc.pid]
        # it had exited when reap returned: its status is there without blocking
        assert os.waitpid(proc.pid, os.WNOHANG) == (proc.pid, 9)
        proc.returncode = -9
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "guest.pid").exists()


def test_reap_leaves_alone_a_pid_that_is_not_its_process(tmp_path: Path) -> None:
    (tmp_path / "reused.pid").write_text(f"{os.getpid()}\n")  # this test: not a leftover
    (tmp_path / "gone.pid").write_text("4194303\n")  # beyond pid_max: no such process
    (tmp_path / "torn.pid").write_text("")  # an empty pidfile (QEMU killed while writing)
    assert leftover.reap(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []
