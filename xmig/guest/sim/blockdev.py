"""The guest's virtual disk: a :class:`BlockDevice` chosen by a disk URL.

- ``file:///abs/path.raw`` → :class:`FileBlockDevice` (pread/pwrite/fdatasync on a raw image).
- ``nbd+unix:///?socket=/path.sock`` → :class:`NbdBlockDevice`, through xmig's storage
  interception point (``xmig.storage.nbdclient.NbdClient``, imported when first used).

A write is *acknowledged* when ``pwrite`` returns. The guest's vCPU does not wait for it:
:class:`QueuedDisk` puts its requests on a bounded queue served in order by one I/O thread
(as a virtio-blk queue is), and learns of each acknowledgement by a callback; it waits only
when the queue is full (a slow disk, or the mirror holding acknowledgements back, slows the
guest through that), on a read, and when paused (the queue drains first, as QEMU drains
block I/O when it stops a VM).
"""

from __future__ import annotations

import importlib
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from xmig.errors import ConfigError, DiskNotFound, GuestError, GuestNotFound, StorageError
from xmig.guest.sim.config import DiskUrl
from xmig.private import create_file


class BlockDevice(Protocol):
    """What the guest's disk I/O goes through."""

    @property
    def size(self) -> int: ...

    def pread(self, offset: int, length: int) -> bytes: ...

    def pwrite(self, offset: int, data: bytes) -> None:
        """Write ``data``; returning is the acknowledgement."""
        ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def make_disk_image(path: Path, size: int) -> Path:
    """A sparse raw image of ``size`` bytes at ``path``: created 0600 when missing, grown
    (never shrunk: no data is cut) when it exists; returns ``path``."""
    try:
        os.close(create_file(path, size))
    except FileExistsError:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
        finally:
            os.close(fd)
    return path


class FileBlockDevice:
    """A raw image file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as err:
            raise GuestNotFound(f"disk image {self.path} does not exist") from err
        except OSError as err:
            raise GuestError(f"cannot open disk image {self.path}: {err}") from err
        self._size = os.fstat(self._fd).st_size

    @property
    def size(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return os.pread(self._fd, length, offset)

    def pwrite(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise GuestError(f"I/O at {offset}+{length} outside disk of {self._size} bytes")


class _NbdClient(Protocol):
    @property
    def size(self) -> int: ...

    def pread(self, offset: int, length: int) -> bytes: ...

    def pwrite(self, offset: int, data: bytes) -> None: ...

    def pwrite_batch(self, writes: list[tuple[int, bytes]]) -> int: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class NbdBlockDevice:
    """An export of xmig's NBD server, reached over its Unix socket."""

    def __init__(self, socket_path: str | Path) -> None:
        self.socket_path = Path(socket_path)
        if not self.socket_path.exists():
            raise GuestNotFound(f"NBD socket {self.socket_path} does not exist")
        try:
            module: Any = importlib.import_module("xmig.storage.nbdclient")
        except ImportError as err:
            raise GuestError("xmig.storage.nbdclient is not available in this build") from err
        try:
            self._client: _NbdClient = module.NbdClient.connect(str(self.socket_path))
        except DiskNotFound as err:
            raise GuestNotFound(f"no NBD server at {self.socket_path}: {err}") from err
        except (StorageError, OSError) as err:
            raise GuestError(f"cannot open NBD disk at {self.socket_path}: {err}") from err

    @property
    def size(self) -> int:
        return self._client.size

    def pread(self, offset: int, length: int) -> bytes:
        return self._client.pread(offset, length)

    def pwrite(self, offset: int, data: bytes) -> None:
        self._client.pwrite(offset, data)

    def pwrite_batch(self, writes: list[tuple[int, bytes]]) -> int:
        """Several writes in one round trip (all sent, then every reply read)."""
        return self._client.pwrite_batch(writes)

    def flush(self) -> None:
        self._client.flush()

    def close(self) -> None:
        self._client.close()


def open_block_device(url: str) -> BlockDevice:
    """The device a disk URL names (GuestNotFound if its file or socket is missing)."""
    disk = DiskUrl.parse(url)
    if disk.scheme == "file":
        return FileBlockDevice(disk.path)
    if disk.scheme == "nbd+unix":
        return NbdBlockDevice(disk.path)
    raise ConfigError(f"disk URL {url!r}: unsupported scheme")  # pragma: no cover


_Request = tuple[int, bytes | int, Callable[[], None] | None]  # (offset, data or length, done)


class QueuedDisk:
    """A :class:`BlockDevice` whose writes and reads the vCPU only submits: one I/O thread
    serves up to ``depth`` queued requests in order. ``done`` (a write's callback) runs on
    that thread once the write is acknowledged. An I/O error is raised to the vCPU at its
    next submit, drain or flush; the requests after it are dropped (never acknowledged)."""

    def __init__(self, device: BlockDevice, depth: int = 32) -> None:
        if depth < 1:
            raise ConfigError(f"disk queue depth must be at least 1, not {depth}")
        self.device = device
        self.error: BaseException | None = None
        self.depth = depth
        self._slots = threading.Semaphore(depth)  # requests submitted and not yet served
        self._lock = threading.Lock()
        self._pending = 0  #: requests submitted and not yet served (what _slots counts down)
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="xmig-guest-io", daemon=True)
        self._thread.start()

    @property
    def size(self) -> int:
        return self.device.size

    @property
    def full(self) -> bool:
        """Every slot is taken: a submit now would wait until a request is served."""
        return self._pending >= self.depth

    def submit_write(self, offset: int, data: bytes, done: Callable[[], None] | None) -> None:
        """Queue a write (blocks while the queue is full)."""
        self._raise()
        self._take_slot()
        self._queue.put((offset, data, done))

    def submit_read(self, offset: int, length: int) -> None:
        """Queue a read whose data the guest does not wait for."""
        self._raise()
        self._take_slot()
        self._queue.put((offset, length, None))

    def _take_slot(self) -> None:
        self._slots.acquire()
        with self._lock:
            self._pending += 1

    def drain(self) -> None:
        """Until every queued request is served; raises the I/O error if one failed."""
        self._queue.join()
        self._raise()

    def pread(self, offset: int, length: int) -> bytes:
        self.drain()
        return self.device.pread(offset, length)

    def pwrite(self, offset: int, data: bytes) -> None:
        self.drain()
        self.device.pwrite(offset, data)

    def flush(self) -> None:
        self.drain()
        self.device.flush()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._queue.put(None)
            self._thread.join()
            self.device.close()

    def _raise(self) -> None:
        if self.error is not None:
            raise GuestError(f"guest disk I/O failed: {self.error}") from self.error

    def _serve(self) -> None:
        batch_write = getattr(self.device, "pwrite_batch", None)
        while True:
            requests = [self._queue.get()]
            # what queued meanwhile goes too: consecutive writes in one round trip
            while len(requests) < self.depth and requests[-1] is not None:
                try:
                    requests.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                k = 0
                while k < len(requests):
                    request = requests[k]
                    if request is None:
                        return
                    if self.error is not None:  # dropped: never acknowledged
                        k += 1
                        continue
                    run = [request]
                    if batch_write is not None:
                        while (k + len(run) < len(requests)
                               and (nxt := requests[k + len(run)]) is not None
                               and not isinstance(nxt[1], int)
                               and not isinstance(request[1], int)):
                            run.append(nxt)
                    self._serve_run(run, batch_write)
                    k += len(run)
            finally:
                for r in requests:
                    if r is not None:
                        with self._lock:
                            self._pending -= 1
                        self._slots.release()
                    self._queue.task_done()

    def _serve_run(self, run: list[_Request],
                   batch_write: Callable[[list[tuple[int, bytes]]], int] | None) -> None:
        try:
            if len(run) > 1 and batch_write is not None:
                batch_write([(r[0], r[1]) for r in run if isinstance(r[1], bytes)])
                for r in run:
                    if r[2] is not None:
                        r[2]()
                return
            offset, payload, done = run[0]
            if isinstance(payload, int):
                self.device.pread(offset, payload)
            else:
                self.device.pwrite(offset, payload)
                if done is not None:
                    done()
        except Exception as err:  # typed errors and OSError; kept for the vCPU
            self.error = err
