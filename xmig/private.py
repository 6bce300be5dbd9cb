"""Files, directories and sockets that only their owner can use.

What xmig makes on a host holds a guest's memory, its disk, or the power to send it
elsewhere, so every such thing is private: directories 0700, files 0600 created with
``O_EXCL`` (never truncating something that exists), Unix sockets 0600 (bound, chmod-ed,
and only then listening, so nobody can connect in between). The process umask is never
changed (it is process-wide, and threads would race on it).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

from xmig.errors import ConfigError, GuestNotFound

DIR_MODE = 0o700
FILE_MODE = 0o600
SOCKET_MODE = 0o600


def private_dir(path: Path, *, exist_ok: bool = False) -> Path:
    """Make ``path`` (and missing parents) as directories of mode 0700. With ``exist_ok`` an
    existing directory is kept, and made 0700 if it is ours; without it, an existing path is
    a :class:`FileExistsError` (a directory that must be new, like a migration's)."""
    missing: list[Path] = []
    cursor = path
    while not cursor.exists() and cursor != cursor.parent:
        missing.append(cursor)
        cursor = cursor.parent
    if not missing and not exist_ok:
        raise FileExistsError(f"{path} exists")
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:
            if directory == path and not exist_ok:
                raise
        if directory.is_symlink() or not directory.is_dir():
            raise ConfigError(f"{directory} is not a directory")
    if not missing and path.stat().st_uid != os.geteuid():
        raise ConfigError(f"{path} belongs to another user: not a private directory")
    os.chmod(path, DIR_MODE)  # mkdir's mode went through the umask
    return path


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` durable (a file or directory just made in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_file(path: Path, size: int = 0) -> int:
    """Create ``path`` (which must not exist: ``O_EXCL``, no symlink followed) with mode 0600
    and ``size`` bytes (sparse); returns an ``O_RDWR`` descriptor the caller closes."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                 FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        if size:
            os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return fd


def unix_listener(path: Path, *, backlog: int = 16) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600 before anyone can connect. A stale
    socket left there is replaced; any other file there is an error (never unlinked)."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{path} exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, SOCKET_MODE)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def not_a_socket(path: Path, what: str) -> str | None:
    """Why ``path`` cannot be ``what`` (e.g. "an xmig guest host's control socket"), in
    words, when it is not a Unix socket: it does not exist, or it is a directory, a regular
    file, ...; None when it is a socket."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return f"{path} not found: no such file or directory (want {what})"
    except OSError as err:
        return f"{path} cannot be looked at ({err.strerror or err}): want {what}"
    if stat.S_ISSOCK(mode):
        return None
    kind = ("a directory" if stat.S_ISDIR(mode) else "a regular file" if stat.S_ISREG(mode)
            else "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode)
            or stat.S_ISBLK(mode) else "not a socket")
    return f"{path} is {kind}, not {what}"


def connect_unix(path: Path, what: str, timeout: float) -> socket.socket:
    """A connected Unix socket to ``path``, which should be ``what``; GuestNotFound saying
    in words why not: not found, a directory, a regular file, nothing listening (a stale
    socket), not allowed."""
    why = not_a_socket(path, what)
    if why is not None:
        raise GuestNotFound(why)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(os.fsencode(path))
    except BaseException as err:
        sock.close()
        if isinstance(err, ConnectionRefusedError):
            raise GuestNotFound(f"nothing listens at {path}: a stale socket (whatever served "
                                f"it exited), not {what}") from err
        if isinstance(err, FileNotFoundError | NotADirectoryError):
            raise GuestNotFound(f"{path} not found: no such file or directory (want "
                                f"{what})") from err
        if isinstance(err, PermissionError):
            raise GuestNotFound(f"cannot connect to {path}: permission denied (a socket of "
                                "another user?)") from err
        if isinstance(err, OSError):
            raise GuestNotFound(f"cannot connect to {path} ({what}): "
                                f"{err.strerror or err}") from err
        raise
    return sock
