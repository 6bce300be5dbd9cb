"""Helpers of the operator-command tests: ``xmig`` as real processes, their output lines
read with timeouts (a reader thread per process; nothing sleeps to wait)."""

from __future__ import annotations

import functools
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xmig.netem import Wan

XMIG = [sys.executable, "-m", "xmig.cli"]
MiB = 1 << 20
SMALL_GUEST = ["--ram", "32MiB", "--disk", "32MiB", "--workload", "oltp", "--rate", "10MB/s",
               "--disk-rate", "2MB/s", "--seed", "7"]


class Proc:
    """A running ``xmig`` process whose stdout is JSON lines; stderr goes to a file."""

    def __init__(self, popen: subprocess.Popen[bytes], stderr: Path) -> None:
        self.popen = popen
        self.stderr = stderr
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            try:
                self.lines.put(json.loads(raw))
            except json.JSONDecodeError:
                self.lines.put({"event": "non-json", "line": raw.decode(errors="replace")})
        self.lines.put(None)

    def expect(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """The next output line matching ``pred``; AssertionError at ``timeout`` or exit."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                item = self.lines.get(timeout=max(left, 0.001))
            except queue.Empty:
                raise AssertionError(f"no matching line in {timeout} s; saw {self.seen}; "
                                     f"stderr: {self.stderr.read_text()[-2000:]}") from None
            if item is None:
                rc = self.popen.wait(timeout=10)
                raise AssertionError(f"exited (rc {rc}) first; saw {self.seen}; "
                                     f"stderr: {self.stderr.read_text()[-2000:]}")
            self.seen.append(item)
            if pred(item):
                return item

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def spawn(argv: list[str], tmp: Path, label: str,
          popen: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen) -> Proc:
    """Start ``xmig ARGV`` (through ``popen``: e.g. a Wan's, to run it in a namespace)."""
    err = tmp / f"{label}.stderr"
    with err.open("wb") as f:
        proc = popen(XMIG + argv, stdout=subprocess.PIPE, stderr=f, stdin=subprocess.DEVNULL)
    return Proc(proc, err)


def xmig(*argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``xmig ARGV`` to its end."""
    return subprocess.run(XMIG + list(argv), capture_output=True, text=True, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL)


def status(ctl: str | Path) -> dict[str, Any]:
    r = xmig("guest", "status", "--guest", str(ctl), "--json", timeout=30)
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def is_ready(role: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("event") == "ready" and e.get("role") == role


@dataclass
class Pair:
    """A destination agent and a source guest host, across a Wan, both ready."""

    agent: Proc
    source: Proc
    port: int  #: the agent's
    ctl: str  #: the source's control socket
    pki: Path
    agent_argv: list[str]  #: to start the agent again (its --listen is HOST:0)


def start_pair(wan: Wan, tmp: Path, procs: list[Proc], *agent_flags: str) -> Pair:
    """A PKI for ``wan``, ``xmig agent`` (workdir ``tmp/dst``, ``agent_flags``) in its
    destination namespace and ``xmig guest start`` (guest vm1, workdir ``tmp/src``) in its
    source namespace, appended to ``procs``; returned once both said ready."""
    pki = tmp / "pki"
    r = xmig("certs", "init", str(pki), "--server-name", wan.dst_addr)
    assert r.returncode == 0, r.stderr
    agent_argv = ["agent", "--listen", f"{wan.dst_addr}:0", "--pki", str(pki),
                  "--workdir", str(tmp / "dst"), *agent_flags, "--json"]
    agent = spawn(agent_argv, tmp, "agent", functools.partial(wan.popen, "dst"))
    procs.append(agent)
    source = spawn(["guest", "start", "--name", "vm1", "--workdir", str(tmp / "src"),
                    *SMALL_GUEST, "--json"], tmp, "source", functools.partial(wan.popen, "src"))
    procs.append(source)
    port = int(agent.expect(is_ready("agent"), 30)["port"])
    ctl = str(source.expect(is_ready("source"), 60)["ctl"])
    return Pair(agent, source, port, ctl, pki, agent_argv)
