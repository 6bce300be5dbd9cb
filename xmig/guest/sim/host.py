"""The host's handle on one reference guest process: start, pause, device state, resume, quit."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from xmig.errors import ConfigError, GuestError, GuestNotFound, GuestStateError
from xmig.guest.sim import shm
from xmig.guest.sim.config import SimConfig
from xmig.guest.sim.control import MessageReader, b64, raise_for, send_message, unb64
from xmig.guest.sim.shm import SharedPaths, SimMemory
from xmig.private import private_dir

START_TIMEOUT_S = 120.0
QUIT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Progress:
    """A snapshot of the guest's progress counter, clocks and counters.

    Monotonic times are ``time.monotonic()`` of this machine (comparable between a source and
    a destination on one host); ``*_wall`` are ``time.time()`` for hosts apart.
    """

    counter: int
    state: str
    last_progress_mono: float
    last_progress_wall: float
    paused_at_mono: float
    paused_at_wall: float
    resumed_at_mono: float
    resumed_at_wall: float
    first_progress_after_resume_mono: float
    rate: float
    """Progress units per second over the guest's last 0.5 s window."""
    page_writes: int
    dirty_marks: int
    disk_writes: int
    disk_write_bytes: int
    disk_reads: int
    udp_requests: int
    table_entries: int
    write_rate_Bps: float
    dirty_rate_Bps: float
    throttle: float
    """The throttle the guest applied in its last window."""
    busy_s: float
    stalled_s: float

    @classmethod
    def from_control(cls, control: shm.ControlBlock) -> Progress:
        i, f = control.snapshot()
        return cls(
            counter=int(i[shm.I_PROGRESS]),
            state=shm.STATE_NAMES.get(int(i[shm.I_STATE]), "unknown"),
            last_progress_mono=float(f[shm.F_LAST_PROGRESS_MONO]),
            last_progress_wall=float(f[shm.F_LAST_PROGRESS_WALL]),
            paused_at_mono=float(f[shm.F_PAUSED_AT_MONO]),
            paused_at_wall=float(f[shm.F_PAUSED_AT_WALL]),
            resumed_at_mono=float(f[shm.F_RESUMED_AT_MONO]),
            resumed_at_wall=float(f[shm.F_RESUMED_AT_WALL]),
            first_progress_after_resume_mono=float(f[shm.F_FIRST_PROGRESS_AFTER_RESUME_MONO]),
            rate=float(f[shm.F_PROGRESS_RATE]),
            page_writes=int(i[shm.I_PAGE_WRITES]),
            dirty_marks=int(i[shm.I_DIRTY_MARKS]),
            disk_writes=int(i[shm.I_DISK_WRITES]),
            disk_write_bytes=int(i[shm.I_DISK_WRITE_BYTES]),
            disk_reads=int(i[shm.I_DISK_READS]),
            udp_requests=int(i[shm.I_UDP_REQUESTS]),
            table_entries=int(i[shm.I_TABLE_ENTRIES]),
            write_rate_Bps=float(f[shm.F_WRITE_RATE]),
            dirty_rate_Bps=float(f[shm.F_DIRTY_RATE]),
            throttle=float(f[shm.F_APPLIED_THROTTLE]),
            busy_s=float(f[shm.F_BUSY_S]),
            stalled_s=float(f[shm.F_STALLED_S]),
        )


def downtime_s(source: Progress, destination: Progress) -> float:
    """Downtime as the guest saw it: the source's last progress before its pause to the
    destination's first progress after its resume (same machine: monotonic clock)."""
    return destination.first_progress_after_resume_mono - source.last_progress_mono


class SimGuest:
    """A reference guest process and the shared files it runs on. Use :meth:`start` (a fresh,
    running guest) or :meth:`start_incoming` (a paused destination); always :meth:`quit`
    (or use it as a context manager)."""

    def __init__(
        self,
        *,
        config: SimConfig,
        name: str,
        paths: SharedPaths,
        process: subprocess.Popen[bytes],
        sock: socket.socket,
        ledger_path: Path,
        log_path: Path,
    ) -> None:
        self.config = config
        self.name = name
        self.paths = paths
        self.ledger_path = ledger_path
        self.log_path = log_path
        self.process = process
        self.fill: dict[str, int] = {}
        self._sock = sock
        self._reader = MessageReader(sock)
        self._lock = threading.Lock()
        self._rid = 0
        self._memory: SimMemory | None = None
        self._udp_port: int | None = None
        self._closed = False

    # ---- starting ---------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        config: SimConfig,
        *,
        workdir: Path,
        paused: bool = False,
        name: str | None = None,
        timeout: float = START_TIMEOUT_S,
    ) -> SimGuest:
        """A fresh guest: RAM filled from the seed, workload running (or ``paused``).

        ``name`` names its log and ledger in ``workdir``; its shared files in
        ``config.shm_dir`` get a unique name (``paths``) built from it."""
        return cls._spawn(config, workdir, "fresh", name, None, paused, timeout)

    @classmethod
    def start_incoming(
        cls,
        config: SimConfig,
        *,
        workdir: Path,
        ram_path: Path | None = None,
        name: str | None = None,
        timeout: float = START_TIMEOUT_S,
    ) -> SimGuest:
        """A destination guest, paused, its RAM file created empty (or ``ram_path``, which
        must exist with ``config.ram_bytes``). It resumes after :meth:`load_device_state`;
        the workload then comes from the device state, not from ``config``."""
        return cls._spawn(config, workdir, "incoming", name, ram_path, True, timeout)

    @classmethod
    def _spawn(
        cls,
        config: SimConfig,
        workdir: Path,
        mode: str,
        name: str | None,
        ram_path: Path | None,
        paused: bool,
        timeout: float,
    ) -> SimGuest:
        disk = config.disk
        if disk is not None and not Path(disk.path).exists():
            what = "disk image" if disk.scheme == "file" else "NBD socket"
            raise GuestNotFound(f"{what} {disk.path} does not exist")
        shm_dir = Path(config.shm_dir)
        if not shm_dir.is_dir():
            raise ConfigError(f"shm_dir {shm_dir} is not a directory")
        # this user's private directory in it: shm_dir (/dev/shm) is listable by everyone
        shm_dir = private_dir(shm_dir / f"xmig-{os.geteuid()}", exist_ok=True)
        token = f"{os.getpid()}-{secrets.token_hex(4)}"
        name = name or f"xmig-sim-{token}"
        # shared files are unique even when two runs choose the same name
        paths = SharedPaths.for_guest(shm_dir, f"xmig-sim-{name}-{token}")
        if ram_path is not None:
            try:
                size = ram_path.stat().st_size
            except FileNotFoundError as err:
                raise GuestNotFound(f"RAM file {ram_path} does not exist") from err
            if size != config.ram_bytes:
                raise ConfigError(f"RAM file {ram_path} has {size} bytes, config says "
                                  f"{config.ram_bytes}")
            paths = dataclasses.replace(paths, ram=ram_path)
        workdir.mkdir(parents=True, exist_ok=True)
        ledger_path = Path(config.ledger_path) if config.ledger_path else workdir / f"{name}.ledger"
        log_path = workdir / f"{name}.log"
        host_sock, child_sock = socket.socketpair()
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        with os.fdopen(log_fd, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "xmig.guest.sim", "--control-fd", str(child_sock.fileno()),
                 "--parent-pid", str(os.getpid())],
                pass_fds=[child_sock.fileno()], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )
        child_sock.close()
        guest = cls(config=config, name=name, paths=paths, process=process, sock=host_sock,
                    ledger_path=ledger_path, log_path=log_path)
        try:
            reply = guest._request({
                "op": "init", "config": config.to_json(), "mode": mode,
                "paths": paths.to_json(), "create_ram": ram_path is None, "paused": paused,
                "ledger_path": str(ledger_path),
            }, timeout)
            guest.fill = dict(reply.get("fill", {}))
            guest._udp_port = reply.get("udp_port")
            guest._memory = SimMemory(paths, config.page_count)
        except BaseException:
            guest._stop_process()
            created = [paths.dirty, paths.control] + ([paths.ram] if ram_path is None else [])
            shm.remove_files(*created)
            raise
        return guest

    # ---- the control channel ----------------------------------------------------------

    def _request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        if self._closed:
            raise GuestStateError(f"guest {self.name} has quit")
        with self._lock:
            self._rid += 1
            rid = self._rid
            op = message["op"]
            try:
                send_message(self._sock, {**message, "id": rid})
            except OSError as err:
                raise self._gone(op) from err
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestError(f"guest {self.name} did not answer {op!r} in {timeout} s")
                if not select.select([self._sock], [], [], left)[0]:
                    continue
                for reply in self._reader.read_available():
                    if reply.get("id") == rid:
                        return raise_for(reply)
                if self._reader.eof:
                    raise self._gone(op)

    def _gone(self, op: str) -> GuestError:
        try:
            rc = self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            rc = None
        try:
            tail = self.log_path.read_text(errors="replace")[-1500:]
        except OSError:
            tail = ""
        return GuestError(f"guest {self.name} exited (rc {rc}) during {op!r}: {tail.strip()}")

    # ---- what the host does with it ---------------------------------------------------

    @property
    def memory(self) -> SimMemory:
        """The guest's RAM and dirty log (SourceMemory and DestinationMemory)."""
        if self._memory is None:
            raise GuestStateError(f"guest {self.name} has quit")
        return self._memory

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def udp_address(self) -> tuple[str, int] | None:
        """Where the UDP service answers (None: no service, or not yet bound)."""
        if self.config.udp_addr is None or not self._udp_port:
            return None
        return (self.config.udp_addr[0], self._udp_port)

    @property
    def state(self) -> str:
        """starting, running, paused, incoming, exited or failed."""
        if self._closed or self._memory is None:
            return "exited"
        if self.process.poll() is not None:
            return "failed" if self.process.returncode else "exited"
        return shm.STATE_NAMES.get(int(self._memory.control.ints[shm.I_STATE]), "unknown")

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def paused(self) -> bool:
        return self.state in ("paused", "incoming")

    def set_throttle(self, fraction: float) -> None:
        self.memory.set_throttle(fraction)

    def pause(self, timeout: float = 5.0) -> None:
        """Stop the vCPU at its next safe point (disk flushed, UDP closed); idempotent."""
        self._request({"op": "pause"}, timeout)

    def resume(self, timeout: float = 5.0) -> None:
        """Run again (a destination: after :meth:`load_device_state`); idempotent."""
        reply = self._request({"op": "resume"}, timeout)
        self._udp_port = reply.get("udp_port") or self._udp_port

    def device_state(self, timeout: float = 5.0) -> bytes:
        """The paused guest's device state (:mod:`xmig.guest.sim.devstate`)."""
        return unb64(str(self._request({"op": "device_state"}, timeout)["state"]))

    def load_device_state(self, state: bytes, timeout: float = 5.0) -> None:
        """Give an incoming guest the source's device state (its RAM must already hold the
        source's memory); GuestStateError if it is not incoming or the state does not fit."""
        self._request({"op": "load_device_state", "state": b64(state)}, timeout)

    def progress(self) -> Progress:
        return Progress.from_control(self.memory.control)

    def wait_until(
        self, predicate: Callable[[Progress], bool], timeout: float, poll_s: float = 0.002
    ) -> Progress:
        """Poll :meth:`progress` until ``predicate`` holds; GuestError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            progress = self.progress()
            if predicate(progress):
                return progress
            if time.monotonic() > deadline:
                raise GuestError(f"guest {self.name}: condition not met in {timeout} s "
                                 f"(state {self.state}, progress {progress.counter})")
            if self.process.poll() is not None:
                raise self._gone("wait_until")
            time.sleep(poll_s)

    def digest(self) -> str:
        """xxh3-128 of the guest's whole RAM (pause it first for a stable answer)."""
        return self.memory.digest()

    def quit(self, *, keep_files: bool = False, timeout: float = QUIT_TIMEOUT_S) -> None:
        """Stop the process (after a pause at a safe point if it answers) and remove its
        shared files — the RAM file too, even one given to :meth:`start_incoming` — unless
        ``keep_files``. Idempotent."""
        if self._closed:
            return
        if self.process.poll() is None:
            with contextlib.suppress(GuestError):
                self._request({"op": "quit"}, timeout)
        self._stop_process(timeout)
        self._closed = True
        if self._memory is not None:
            self._memory.close()
            self._memory = None
        if not keep_files:
            shm.remove_files(self.paths.ram, self.paths.dirty, self.paths.control)

    def _stop_process(self, timeout: float = QUIT_TIMEOUT_S) -> None:
        """Close the control channel (the guest exits on end of file), wait, then kill."""
        self._sock.close()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> SimGuest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.quit()

    def __repr__(self) -> str:
        return f"SimGuest({self.name!r}, pid {self.process.pid}, {self.state})"
