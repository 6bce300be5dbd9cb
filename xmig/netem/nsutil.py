"""Network namespaces held by threads and file descriptors (Linux, root).

A network namespace belongs to a *thread*: a :class:`NetnsThread` either unshares a fresh,
anonymous namespace or enters an existing one (by fd or path) and then runs the calls given
to it there. Sockets, netlink sockets (pyroute2) and child processes it creates live in that
namespace, and ``/proc/sys/net`` opened from it shows that namespace's settings. An anonymous
namespace vanishes, with its interfaces, when the last thread, process, socket or fd holding
it is gone: when the creating process dies, however it dies, nothing is left.

Named namespaces (``/run/netns/NAME``, usable with ``ip netns exec``) are bind mounts of the
thread's namespace file; :func:`remove_named_netns` unmounts them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from xmig.errors import NetemError, NetemPermissionError

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
MNT_DETACH = 2
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        cls = NetemPermissionError if err in (errno.EPERM, errno.EACCES) else NetemError
        raise cls(f"{what}: {os.strerror(err)}")


def unshare_net() -> None:
    """Move the calling thread into a new, empty network namespace."""
    _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")


def setns_net(fd: int) -> None:
    """Move the calling thread into the network namespace that ``fd`` refers to."""
    _check(_libc.setns(fd, CLONE_NEWNET), "setns(CLONE_NEWNET)")


def set_pdeathsig(signum: int) -> None:
    """Ask the kernel to send ``signum`` to this process when its parent thread exits."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def netns_inode(fd: int) -> int:
    """The inode number identifying the namespace ``fd`` refers to."""
    return os.fstat(fd).st_ino


def write_sysctl(key: str, value: str) -> None:
    """Write ``/proc/sys/<key with / for .>`` (in the calling thread's network namespace)."""
    path = "/proc/sys/" + key.replace(".", "/")
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as err:
        raise NetemError(f"cannot set {key} = {value}: {err}") from err


def read_sysctl(key: str) -> str:
    """Read ``/proc/sys/<key>`` (in the calling thread's network namespace)."""
    with open("/proc/sys/" + key.replace(".", "/")) as f:
        return f.read().strip()


def _mount(source: str, target: str, flags: int) -> int:
    return int(_libc.mount(source.encode(), target.encode(), b"none", flags, None))


def _prepare_run_dir() -> None:
    """Make /run/netns a shared mount point, as ``ip netns add`` does."""
    os.makedirs(NETNS_RUN_DIR, exist_ok=True)
    if _mount("", NETNS_RUN_DIR, MS_SHARED | MS_REC) == 0:
        return
    if _mount(NETNS_RUN_DIR, NETNS_RUN_DIR, MS_BIND | MS_REC) != 0:
        _check(-1, f"bind mount {NETNS_RUN_DIR}")
    _check(_mount("", NETNS_RUN_DIR, MS_SHARED | MS_REC), f"make {NETNS_RUN_DIR} shared")


def remove_named_netns(name: str) -> bool:
    """Unmount and delete ``/run/netns/NAME``; False if it did not exist."""
    path = os.path.join(NETNS_RUN_DIR, name)
    if not os.path.exists(path):
        return False
    _libc.umount2(path.encode(), MNT_DETACH)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as err:
        raise NetemError(f"cannot remove {path}: {err}") from err
    return True


def _bind_thread_netns(name: str) -> None:
    _prepare_run_dir()
    path = os.path.join(NETNS_RUN_DIR, name)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    except FileExistsError as err:
        raise NetemError(f"network namespace {name} exists already") from err
    if _mount("/proc/thread-self/ns/net", path, MS_BIND) != 0:
        err_no = ctypes.get_errno()
        os.unlink(path)
        raise NetemError(f"bind mount of namespace {name}: {os.strerror(err_no)}")


class NetnsThread:
    """A thread living in one network namespace that runs the calls given to it there.

    ``NetnsThread("src")`` makes a fresh anonymous namespace; ``bind_name="x-src"`` also
    mounts it at /run/netns/x-src; ``enter_fd`` enters an existing namespace instead.
    :attr:`fd` stays open (it holds the namespace) until :meth:`close`.
    """

    def __init__(self, label: str, *, bind_name: str | None = None, enter_fd: int | None = None):
        self.label = label
        self.bind_name = bind_name
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(
            target=self._run, args=(enter_fd,), name=f"netns-{label}", daemon=True
        )
        self._started: Future[int] = Future()
        self._thread.start()
        self.fd: int = self._started.result(timeout=10)

    def _run(self, enter_fd: int | None) -> None:
        try:
            if enter_fd is not None:
                setns_net(enter_fd)
            else:
                unshare_net()
                if self.bind_name is not None:
                    _bind_thread_netns(self.bind_name)
            fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException as err:  # handed to the creator
            self._started.set_exception(err)
            return
        self._started.set_result(fd)
        while (item := self._calls.get()) is not None:
            fn, fut = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as err:  # handed to the caller
                    fut.set_exception(err)

    @property
    def inode(self) -> int:
        """The namespace's inode number (what ``/proc/PID/ns/net`` links show)."""
        return netns_inode(self.fd)

    @property
    def alive(self) -> bool:
        """True until :meth:`close`."""
        return self._thread.is_alive()

    def call(self, fn: Callable[[], T], timeout: float | None = 30.0) -> T:
        """Run ``fn()`` in the namespace's thread and return its result (or raise its error)."""
        if not self._thread.is_alive():
            raise NetemError(f"namespace thread {self.label} is closed")
        fut: Future[T] = Future()
        self._calls.put((fn, fut))
        return fut.result(timeout=timeout)

    def close(self) -> None:
        """Stop the thread and close the fd (the namespace goes when nothing else holds it)."""
        if self._thread.is_alive():
            self._calls.put(None)
            if threading.current_thread() is not self._thread:
                self._thread.join(timeout=10)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
