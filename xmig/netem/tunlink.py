"""The faithful link: three network namespaces and the TUN emulator process (root).

:class:`TunLink` builds the topology of :mod:`xmig.netem.topology` in anonymous namespaces
held by :class:`~xmig.netem.nsutil.NetnsThread` threads (or, for the operator CLI, with src and
dst also mounted as ``/run/netns/NAME-src`` and ``NAME-dst``), starts the emulator process
from the middle namespace's thread, and drives it over JSON lines on its stdin/stdout.

Cleanup after a crash needs no code: the namespaces are held only by this process (threads,
fds, sockets) and by the emulator, which the kernel kills when its parent thread dies
(``PR_SET_PDEATHSIG``) and which also exits on EOF of its control pipe. Programs started with
:meth:`TunLink.popen` get the same death signal. Only named namespaces (CLI) outlive a crash;
``xmig netem up`` removes such leftovers of its name when it starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from xmig.errors import ConfigError, NetemError, NetemPermissionError
from xmig.netem.nsutil import NetnsThread, remove_named_netns
from xmig.netem.relay import terminate_children
from xmig.netem.spec import LinkSpec

#: ``python -c _LAUNCHER PPID PROG ARGS...``: exec PROG with PR_SET_PDEATHSIG = SIGKILL, unless
#: the parent PPID is already gone (then exit 137).
_LAUNCHER = (
    "import ctypes,os,sys\n"
    "ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)\n"
    "os.getppid() == int(sys.argv[1]) or os._exit(137)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)
REQUEST_TIMEOUT_S = 10.0


class EmulatorProcess:
    """The emulator child and its JSON-line control pipe (one request at a time)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self._out = proc.stdout.fileno()
        self._in = proc.stdin
        self._buf = b""
        self._lock = threading.Lock()
        self._next_id = 1

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read_message(self, timeout: float) -> dict[str, Any]:
        """The next JSON line from the emulator; NetemError on EOF or timeout."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._out], [], [], max(0.0, left))
            if not ready:
                raise NetemError(f"the emulator (pid {self.pid}) did not answer in {timeout} s")
            chunk = os.read(self._out, 65536)
            if not chunk:
                code = self.proc.poll()
                raise NetemError(f"the emulator (pid {self.pid}) exited (status {code})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    def wait_ready(self, timeout: float) -> None:
        message = self.read_message(timeout)
        if message.get("event") != "ready":
            cls = (
                NetemPermissionError
                if message.get("type") == "NetemPermissionError"
                else NetemError
            )
            raise cls(f"the emulator failed to start: {message.get('error', message)}")

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return the emulator's answer once it has acted on it."""
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            try:
                self._in.write((json.dumps({"id": rid, "op": op, **fields}) + "\n").encode())
                self._in.flush()
            except (BrokenPipeError, ValueError) as err:
                raise NetemError(f"the emulator (pid {self.pid}) is gone") from err
            answer = self.read_message(REQUEST_TIMEOUT_S)
        if answer.get("id") != rid:
            raise NetemError(f"the emulator answered request {answer.get('id')}, not {rid}")
        if not answer.get("ok"):
            raise NetemError(f"the emulator refused {op}: {answer.get('error')}")
        return answer

    def stop(self, timeout: float = 5.0) -> None:
        """Close the control pipe (the emulator exits on EOF); kill it if it lingers."""
        with contextlib.suppress(OSError):
            self._in.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class TunLink:
    """src, mid and dst namespaces with the TUN emulator between them. See :class:`Wan`."""

    approximate = False

    def __init__(self, spec: LinkSpec, *, name: str | None = None) -> None:
        from xmig.netem.topology import Addressing

        self.spec = spec
        self.name = name
        self.addressing = Addressing()
        self.src_addr = self.addressing.src_addr
        self.dst_addr = self.addressing.dst_addr
        self._threads: dict[str, NetnsThread] = {}
        self._emulator: EmulatorProcess | None = None
        self._children: list[subprocess.Popen[bytes]] = []

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Build namespaces, links, addresses and routes; start the emulator."""
        if not os.path.exists("/dev/net/tun"):
            raise NetemError("no /dev/net/tun on this machine")
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        from xmig.netem import topology

        a = self.addressing
        for side in ("src", "dst"):
            bind = f"{self.name}-{side}" if self.name else None
            self._threads[side] = NetnsThread(side, bind_name=bind)
        mid = self._threads["mid"] = NetnsThread("mid")
        src_fd, dst_fd = self._threads["src"].fd, self._threads["dst"].fd
        mid.call(lambda: topology.setup_mid_links(a, src_fd, dst_fd))
        self._threads["src"].call(lambda: topology.setup_host(a, "src"))
        self._threads["dst"].call(lambda: topology.setup_host(a, "dst"))
        argv = [
            sys.executable, "-m", "xmig.netem.emulator",
            "--parent", str(os.getpid()),
            "--spec", json.dumps(self.spec.to_dict()),
            "--tun-fwd", a.tun_fwd, "--tun-rev", a.tun_rev,
        ]  # fmt: skip
        proc = mid.call(
            lambda: subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        )
        self._emulator = EmulatorProcess(proc)
        self._emulator.wait_ready(timeout=30)
        mid.call(lambda: topology.setup_mid_routing(a))

    def close(self) -> None:
        """Stop children and the emulator, release the namespaces (and their mounts)."""
        terminate_children(self._children)
        if self._emulator is not None:
            self._emulator.stop()
            self._emulator = None
        for side, thread in list(self._threads.items()):
            if thread.bind_name is not None:
                remove_named_netns(thread.bind_name)
            thread.close()
            del self._threads[side]

    # -- hosts -------------------------------------------------------------------------

    def _thread(self, side: str) -> NetnsThread:
        if side not in ("src", "dst"):
            raise NetemError(f"side must be 'src' or 'dst', not {side!r}")
        thread = self._threads.get(side)
        if thread is None:
            raise NetemError("the link is not running")
        return thread

    def netns_fd(self, side: str) -> int:
        """An fd of the namespace of ``side`` (valid while the link runs)."""
        return self._thread(side).fd

    def netns_inodes(self) -> dict[str, int]:
        """Inode numbers of the three namespaces (to check that they are gone later)."""
        return {side: thread.inode for side, thread in self._threads.items()}

    def socket(self, side: str, family: int, type: int) -> socket.socket:
        return self._thread(side).call(lambda: socket.socket(family, type))

    def dst_endpoint(self, port: int) -> tuple[str, int]:
        return (self.dst_addr, port)

    def popen(self, side: str, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        thread = self._thread(side)
        for key in ("shell", "executable", "preexec_fn"):
            if kw.get(key):
                raise ConfigError(f"popen runs an argv list; {key}= is not supported")
        if shutil.which(argv[0], path=(kw.get("env") or os.environ).get("PATH")) is None:
            raise FileNotFoundError(argv[0])
        full = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(os.getpid()), *argv]
        proc: subprocess.Popen[bytes] = thread.call(lambda: subprocess.Popen(full, **kw))
        self._children.append(proc)
        return proc

    # -- link control ------------------------------------------------------------------

    def _request(self, op: str, **fields: Any) -> dict[str, Any]:
        if self._emulator is None:
            raise NetemError("the link is not running")
        return self._emulator.request(op, **fields)

    def set(self, spec: LinkSpec) -> None:
        self._request("set", spec=spec.to_dict())
        self.spec = spec

    def cut(self) -> None:
        self._request("cut")

    def restore(self) -> None:
        self._request("restore")

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self._request("stats")["stats"]
        stats["mode"] = "tun"
        stats["emulator_pid"] = self.emulator_pid
        return stats

    @property
    def emulator_pid(self) -> int | None:
        """Pid of the emulator process, None when not running."""
        return None if self._emulator is None else self._emulator.pid


def sweep_named(name: str) -> list[str]:
    """Remove ``/run/netns/NAME-src`` and ``NAME-dst`` left by a crashed link; say which."""
    removed = []
    for side in ("src", "dst"):
        if remove_named_netns(f"{name}-{side}"):
            removed.append(f"{name}-{side}")
    return removed
