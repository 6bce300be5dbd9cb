"""Start a QEMU guest under TCG and drive it over QMP (``qemu.qmp``).

::

    image = build_test_guest("build/guest")
    config = QemuConfig(kernel=image.kernel, initrd=image.initrd, disk=disk_raw,
                        append=guest_cmdline("memdisk", mem_mb=64))
    async with await QemuGuest.launch(config, workdir) as guest:
        first = await guest.wait_for_progress(30)     # the workload runs
        await guest.stop(); await guest.cont(); await guest.status()

The argv follows NOTES-MACHINE (TCG, q35, ``-cpu max``, no defaults, kernel + initrd boot, the
serial console to a file, the disk as virtio-blk with ``cache=none,aio=threads``, QMP on a unix
socket). Guest RAM is a shared file (``memory-backend-file``, ``share=on``, in ``/dev/shm`` by
default) so another process can map it later. Every path given to QEMU is absolute.
``popen`` (``subprocess.Popen``'s signature) starts QEMU elsewhere, e.g. in a network namespace:
``popen=functools.partial(wan.popen, "src")``.

Waiting: the QMP socket's appearance and the serial log's growth are polled every 20–50 ms
under an overall deadline (a file gives no readiness event that works for both); QMP replies
are awaited directly.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError, Runstate

from xmig.errors import ConfigError, GuestNotFound, GuestStateError, QemuError
from xmig.guest.qemu.progress import Progress, SerialTail, parse_error, parse_progress
from xmig.private import create_file, private_dir

PopenFn = Callable[..., "subprocess.Popen[bytes]"]
POLL_S = 0.05
_names = itertools.count()


#: where RAM files go by default: this user's private (0700) directory in /dev/shm, not
#: /dev/shm itself, which every user can list
SHM_DIR = Path(f"/dev/shm/xmig-{os.geteuid()}")


@dataclass(frozen=True)
class QemuConfig:
    """What to boot. ``mem_path``: the shared RAM file (default
    ``/dev/shm/xmig-UID/NAME-PID-N.ram``, 0600 in a 0700 directory);
    ``extra``: more QEMU arguments, appended (e.g. ``("-S",)`` or ``("-incoming", "defer")``)."""

    kernel: Path
    initrd: Path
    append: str
    disk: Path | None = None
    ram_mb: int = 256
    smp: int = 1
    name: str = "xmig-guest"
    mem_path: Path | None = None
    disk_cache: str = "none"
    qemu: str = "qemu-system-x86_64"
    extra: tuple[str, ...] = ()


class QemuGuest:
    """One QEMU process and its QMP connection. Use :meth:`launch`; always :meth:`quit` (or
    ``async with``), which also removes the RAM file and the QMP socket."""

    def __init__(self, config: QemuConfig, workdir: str | os.PathLike[str]) -> None:
        self.config = config
        self.workdir = Path(workdir).resolve()
        self.serial_log = self.workdir / f"{config.name}.serial.log"
        self.qemu_log = self.workdir / f"{config.name}.qemu.log"
        #: QEMU writes its pid here (a host killed -9 leaves it running: ``leftover.reap``)
        self.pidfile = self.workdir / f"{config.name}.pid"
        self.mem_path = (
            Path(config.mem_path).resolve()
            if config.mem_path
            else SHM_DIR / f"{config.name}-{os.getpid()}-{next(_names)}.ram"
        )
        self._sock_dir: str | None = None
        sock = self.workdir / f"{config.name}.qmp"
        if len(str(sock)) > 100:  # sun_path holds 108 bytes
            self._sock_dir = tempfile.mkdtemp(prefix="xmig-qmp-")
            sock = Path(self._sock_dir) / "qmp"
        self.qmp_socket = sock
        self.launched_at = 0.0
        self.last_progress: Progress | None = None
        self.history: collections.deque[Progress] = collections.deque(maxlen=10_000)
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QMPClient | None = None
        self._tail = SerialTail(self.serial_log)
        self._gone = False
        self._owns_files = False
        self._adopted_pid: int | None = None
        self.disk_device = "d0"  #: the drive whose writes are mirrored (``-drive id=``)
        self.disk_bytes: int | None = None  #: its virtual size, when known from QMP

    @classmethod
    def adopt(cls, config: QemuConfig, workdir: str | os.PathLike[str], client: QMPClient, *,
              qmp_socket: Path, pid: int | None, serial_log: Path | None,
              disk_device: str, disk_bytes: int | None) -> QemuGuest:
        """A QEMU xmig did not start, driven through ``client`` (connected to its QMP at
        ``qmp_socket``); see :func:`xmig.guest.qemu.attach.attach_qemu`. Its files are never
        removed by :meth:`quit`."""
        guest = cls(config, workdir)
        guest.qmp_socket, guest._qmp, guest._adopted_pid = qmp_socket, client, pid
        if serial_log is not None:
            guest.serial_log = serial_log
            guest._tail = SerialTail(serial_log)
        guest.disk_device, guest.disk_bytes = disk_device, disk_bytes
        guest.launched_at = time.monotonic()
        return guest

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    async def launch(
        cls,
        config: QemuConfig,
        workdir: str | os.PathLike[str],
        *,
        popen: PopenFn | None = None,
        timeout: float = 15.0,
    ) -> QemuGuest:
        """Start QEMU and connect QMP; GuestNotFound for a missing kernel, initrd or disk,
        QemuError when QEMU is missing, exits or its QMP does not answer within ``timeout``."""
        guest = cls(config, workdir)
        try:
            await guest.start(popen=popen, timeout=timeout)
        except BaseException:
            await guest.quit()
            raise
        return guest

    def argv(self) -> list[str]:
        """QEMU's command line."""
        c = self.config
        for label, path in (("kernel", c.kernel), ("initrd", c.initrd), ("disk", c.disk)):
            if path is not None and "," in str(path):
                raise ConfigError(f"{label} path {path} has a comma (QEMU option syntax)")
        if c.ram_mb <= 0 or c.smp <= 0:
            raise ConfigError(f"bad RAM {c.ram_mb} MiB or {c.smp} vCPUs")
        argv = [
            c.qemu, "-name", c.name, "-accel", "tcg",
            "-machine", "q35,memory-backend=mem", "-cpu", "max",
            "-m", f"{c.ram_mb}M", "-smp", str(c.smp),
            "-object",
            f"memory-backend-file,id=mem,size={c.ram_mb}M,mem-path={self.mem_path},share=on",
            "-display", "none", "-nodefaults", "-no-user-config",
            "-kernel", str(Path(c.kernel).resolve()), "-initrd", str(Path(c.initrd).resolve()),
            "-append", c.append,
            "-serial", f"file:{self.serial_log}",
        ]  # fmt: skip
        if c.disk is not None:
            drive = (
                f"file={Path(c.disk).resolve()},format=raw,if=none,id=d0,"
                f"cache={c.disk_cache},aio=threads"
            )
            argv += ["-drive", drive, "-device", "virtio-blk-pci,drive=d0"]
        argv += ["-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
                 "-pidfile", str(self.pidfile), *c.extra]
        return argv

    async def start(self, *, popen: PopenFn | None = None, timeout: float = 15.0) -> None:
        if self._proc is not None or self._gone:
            raise GuestStateError(f"guest {self.config.name} was already started")
        c = self.config
        for label, path in (("kernel", c.kernel), ("initrd", c.initrd)):
            if not Path(path).is_file():
                raise GuestNotFound(f"{label} {path} not found")
        if c.disk is not None and not Path(c.disk).exists():  # a file or a block device
            raise GuestNotFound(f"disk {c.disk} not found")
        if shutil.which(c.qemu) is None:
            raise QemuError(f"{c.qemu} not found: apt-get install qemu-system-x86")
        argv = self.argv()
        private_dir(self.workdir, exist_ok=True)
        if self.mem_path.parent == SHM_DIR:
            private_dir(SHM_DIR, exist_ok=True)
        try:  # QEMU maps the file made here: 0600, never another guest's (O_EXCL)
            os.close(create_file(self.mem_path, c.ram_mb << 20))
        except FileExistsError as err:
            raise GuestStateError(f"RAM file {self.mem_path} exists (another guest's?)") from err
        for stale in (self.serial_log, self.qmp_socket):
            stale.unlink(missing_ok=True)
        try:
            self._proc = self._spawn(popen or subprocess.Popen, argv)
        except BaseException:
            self.mem_path.unlink(missing_ok=True)
            raise
        self._owns_files = True
        self.launched_at = time.monotonic()
        await self._connect(self.launched_at + timeout)

    def _spawn(self, popen: PopenFn, argv: list[str]) -> subprocess.Popen[bytes]:
        fd = os.open(self.qemu_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as log:
            try:
                return popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            except OSError as err:
                raise QemuError(f"cannot start {argv[0]}: {err}") from err

    async def _connect(self, deadline: float) -> None:
        proc = self._proc
        assert proc is not None
        last: Exception | None = None
        while True:
            if proc.poll() is not None:
                raise QemuError(f"QEMU exited with status {proc.returncode}: {self.log_tail()}")
            if self.qmp_socket.exists():
                with contextlib.suppress(OSError):  # QEMU made it with the umask's mode
                    os.chmod(self.qmp_socket, 0o600)
                client = QMPClient(self.config.name)
                try:
                    await client.connect(str(self.qmp_socket))
                except QMPError as err:
                    last = err
                else:
                    self._qmp = client
                    return
            if time.monotonic() >= deadline:
                raise QemuError(f"QMP at {self.qmp_socket} did not answer in time: {last}")
            await asyncio.sleep(0.02)

    async def quit(self, timeout: float = 5.0) -> None:
        """Ask QEMU to quit (QMP ``quit``), kill it if it has not within ``timeout``, remove
        the RAM file and the socket. Idempotent."""
        qmp, self._qmp = self._qmp, None
        proc = self._proc
        self._gone = True
        try:
            if qmp is not None:
                with contextlib.suppress(QMPError, OSError, TimeoutError):
                    if proc is None or proc.poll() is None:  # adopted, or still alive
                        await asyncio.wait_for(qmp.execute("quit"), timeout)
                # after ``quit`` the bottom half re-raises the EOF it met: expected, not news
                with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError):
                    await asyncio.wait_for(qmp.disconnect(), timeout)
            if proc is not None and proc.poll() is None:
                if qmp is None:  # detached: no QMP to ask; QEMU quits on SIGTERM
                    proc.terminate()
                try:
                    await asyncio.to_thread(proc.wait, timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    await asyncio.to_thread(proc.wait)
        finally:
            if proc is not None and proc.poll() is None:  # cancelled or failed on the way
                proc.kill()
                proc.wait()
            self._cleanup()

    async def detach(self) -> None:
        """Close the QMP connection and leave QEMU running (it serves one QMP client at a
        time: another may connect now). :meth:`quit` still stops a QEMU started here."""
        qmp, self._qmp = self._qmp, None
        if qmp is not None:
            with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError):
                await asyncio.wait_for(qmp.disconnect(), 5.0)

    async def wait_gone(self, stop: asyncio.Event) -> None:
        """Host this guest (started here): return once its QEMU process has exited (it quit
        or was killed), or stop it first when ``stop`` is set."""
        proc = self._proc
        if proc is None:
            raise GuestStateError(f"guest {self.config.name} was not started here")
        exited = asyncio.ensure_future(asyncio.to_thread(proc.wait))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([exited, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            await self.quit()
            await asyncio.wait([exited])

    def kill(self) -> None:
        """Kill QEMU at once (no QMP), e.g. from a synchronous teardown."""
        self._gone = True
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._owns_files:
            self.mem_path.unlink(missing_ok=True)
            self.qmp_socket.unlink(missing_ok=True)
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)

    async def __aenter__(self) -> QemuGuest:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.quit()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else self._adopted_pid

    @property
    def alive(self) -> bool:
        """QEMU runs and its QMP is connected."""
        qmp = self._qmp
        return (qmp is not None and qmp.runstate is Runstate.RUNNING
                and (self._proc is None or self._proc.poll() is None))

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    # -- QMP -----------------------------------------------------------------------------

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run one QMP command; QemuError when QEMU refuses it or is gone."""
        if self._qmp is None:
            raise GuestStateError(f"guest {self.config.name} is not running (no QMP)")
        try:
            return await self._qmp.execute(command, arguments)
        except ExecuteError as err:
            raise QemuError(f"QMP {command}: {err.error_class}: {err}") from err
        except (QMPError, OSError) as err:
            rc = self.returncode
            gone = f" (QEMU exited with status {rc})" if rc is not None else ""
            raise QemuError(f"QMP {command} failed{gone}: {err!r}") from err

    @contextlib.contextmanager
    def listener(self, *names: str) -> Iterator[EventListener]:
        """QMP events named ``names`` (all when none), queued from now on until read::

            with guest.listener("MIGRATION") as events:
                await guest.execute("migrate", ...)
                event = await events.get()   # event["data"]["status"]
        """
        if self._qmp is None:
            raise GuestStateError(f"guest {self.config.name} is not running (no QMP)")
        with self._qmp.listener(names) as events:
            yield events

    async def status(self) -> str:
        """QEMU's run state: ``running``, ``paused``, ``prelaunch``, ``inmigrate``, …"""
        reply = await self.execute("query-status")
        return str(reply["status"])

    async def stop(self) -> None:
        """Pause the vCPUs (the guest's clock stops too)."""
        await self.execute("stop")

    async def cont(self) -> None:
        """Resume the vCPUs."""
        await self.execute("cont")

    async def vcpu_threads(self) -> list[int]:
        """Host thread ids of the vCPUs (``query-cpus-fast``), for a CPU quota."""
        reply = await self.execute("query-cpus-fast")
        return [int(cpu["thread-id"]) for cpu in reply]

    # -- the serial console ------------------------------------------------------------

    async def wait_for_progress(
        self, timeout: float, *, min_counter: int | None = None
    ) -> Progress:
        """The newest progress line printed since the last call, waiting up to ``timeout``
        seconds for one (and for ``counter >= min_counter`` when given). QemuError when none
        comes in time, QEMU exits, or the guest prints an ``XMIG error`` line."""
        deadline = time.monotonic() + timeout
        latest: Progress | None = None
        while True:
            now = time.monotonic()
            for line in self._tail.read_lines():
                message = parse_error(line)
                if message is not None:
                    raise QemuError(f"guest {self.config.name}: {message}")
                progress = parse_progress(line, at=now)
                if progress is not None:
                    latest = progress
                    self.history.append(progress)
            if latest is not None and (min_counter is None or latest.counter >= min_counter):
                self.last_progress = latest
                return latest
            rc = self.returncode
            if rc is not None:
                raise QemuError(f"QEMU exited with status {rc}: {self.log_tail()}")
            if now >= deadline:
                seen = f"last counter {latest.counter}" if latest else "no progress line"
                raise QemuError(
                    f"guest {self.config.name}: no progress within {timeout:g} s ({seen})"
                )
            await asyncio.sleep(POLL_S)

    def log_tail(self) -> str:
        try:
            text = self.qemu_log.read_text(errors="replace").strip()
        except OSError:
            return "(no log)"
        return " / ".join(text.splitlines()[-3:]) or "(empty log)"
