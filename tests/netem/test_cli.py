"""``xmig netem`` end to end: up in the foreground, cut/restore/set/stats, SIGTERM, leftovers."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.netem.helpers import LineReader, netns_holders, wait_pid_exit
from xmig.cli import main
from xmig.netem.cli import socket_path
from xmig.netem.nsutil import NetnsThread

pytestmark = pytest.mark.root


class Up:
    """A running ``xmig netem up`` process and what it printed."""

    def __init__(self, name: str, *flags: str) -> None:
        argv = [sys.executable, "-m", "xmig.cli", "netem", "up", "--name", name, *flags]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert self.proc.stdout is not None
        self.out = LineReader(self.proc.stdout.fileno())
        self.ready, self.before = self.out.wait_for("ready", timeout=30)
        pid_line = next(line for line in self.before if "emulator pid" in line)
        self.emulator_pid = int(pid_line.rsplit(" ", 1)[1])

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.proc.send_signal(signum)
        code = self.proc.wait(15)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code


@pytest.fixture
def name() -> Iterator[str]:
    name = f"xt{os.getpid()}"
    yield name
    main(["netem", "down", "--name", name])  # whatever a failed test left


@contextlib.contextmanager
def host(ns_name: str) -> Iterator[NetnsThread]:
    """A thread inside the named namespace /run/netns/NAME."""
    fd = os.open(f"/run/netns/{ns_name}", os.O_RDONLY)
    try:
        thread = NetnsThread(ns_name, enter_fd=fd)
    finally:
        os.close(fd)
    try:
        yield thread
    finally:
        thread.close()


def connects_within(src: NetnsThread, addr: tuple[str, int], timeout: float) -> bool:
    with src.call(socket.socket) as sock:
        sock.setblocking(False)
        assert sock.connect_ex(addr) == errno.EINPROGRESS
        return bool(select.select([], [sock], [], timeout)[1])


def test_cli_up_drive_and_tear_down(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    up = Up(name, "--rate", "100mbit", "--rtt", "20ms")
    try:
        assert up.ready == f"ready {name} src=10.231.1.2 dst=10.231.2.2"
        assert os.path.exists(f"/run/netns/{name}-src") and os.path.exists(socket_path(name))
        with host(f"{name}-src") as src, host(f"{name}-dst") as dst:
            inodes = {src.inode, dst.inode}
            listener = dst.call(socket.socket)
            listener.bind(("0.0.0.0", 0))
            listener.listen(8)
            target = ("10.231.2.2", listener.getsockname()[1])
            with listener:
                assert connects_within(src, target, 5)
                assert main(["netem", "cut", "--name", name]) == 0
                assert not connects_within(src, target, 0.5)
                assert main(["netem", "restore", "--name", name]) == 0
                assert connects_within(src, target, 5)
        capsys.readouterr()
        assert main(["netem", "stats", "--name", name]) == 0
        stats = json.loads(capsys.readouterr().out)
        assert stats["fwd"]["dropped_packets"]["cut"] >= 1 and stats["cut"] is False
        assert main(["netem", "set", "--name", name, "--rtt", "60ms", "--loss", "0.1%"]) == 0
        assert "rtt 60ms, loss 0.1%" in capsys.readouterr().out
        assert main(["netem", "stats", "--name", name]) == 0
        spec = json.loads(capsys.readouterr().out)["spec"]
        assert (spec["delay_fwd_s"], spec["loss"], spec["rate_bps"]) == (0.03, 0.001, 10**8)
        # bad flags: one red line, exit 2
        assert main(["netem", "set", "--name", name, "--loss", "150%"]) == 2
        err = capsys.readouterr().err.strip()
        assert "ConfigError" in err and "\n" not in err
        assert main(["netem", "up", "--name", name]) == 2  # the name is taken
        assert "is up already" in capsys.readouterr().err
    finally:
        code = up.stop()
    assert code == 0
    assert wait_pid_exit(up.emulator_pid, 10)
    assert not [n for n in os.listdir("/run/netns") if n.startswith(f"{name}-")]
    assert not os.path.exists(socket_path(name))
    assert netns_holders(inodes) == []
    assert main(["netem", "stats", "--name", name]) == 2  # nobody serves it now


def test_cli_up_removes_leftovers_of_a_killed_link(name: str) -> None:
    first = Up(name, "--rtt", "10ms")
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    assert wait_pid_exit(first.emulator_pid, 10)
    assert os.path.exists(f"/run/netns/{name}-src")  # named namespaces outlive a crash
    second = Up(name, "--rtt", "10ms")
    try:
        removed = [line for line in second.before if line.startswith("removed leftover")]
        assert any(line.endswith(f"{name}-src") for line in removed)
    finally:
        assert second.stop(signal.SIGINT) == 0
    assert not [n for n in os.listdir("/run/netns") if n.startswith(f"{name}-")]


def test_cli_bad_flags_are_config_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["netem", "up", "--rate", "fast", "--name", "x"]) == 2
    assert main(["netem", "up", "--name", "../etc"]) == 2
    assert main(["netem", "set", "--name", "nobody-here"]) == 2
    err = capsys.readouterr().err
    assert err.count("ConfigError") == 3
