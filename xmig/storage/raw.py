"""A raw disk image file as a :class:`~xmig.storage.disk.BlockBackend` (pread/pwrite/fsync).

Errors are typed: a missing image is :class:`~xmig.errors.DiskNotFound`; ENOSPC, EDQUOT and
EFBIG (a file size limit, RLIMIT_FSIZE) are :class:`~xmig.errors.DiskFull`; any other
``OSError`` is a :class:`~xmig.errors.StorageError`. Holes are found with
``SEEK_DATA``/``SEEK_HOLE`` and made with ``fallocate(PUNCH_HOLE)``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

from xmig.errors import DiskFull, DiskNotFound, StorageError
from xmig.private import create_file

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = 1 << 20

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def storage_error(err: OSError, what: str) -> StorageError:
    """The typed error for an ``OSError`` raised while doing ``what``."""
    if err.errno in _FULL:
        return DiskFull(f"{what}: {os.strerror(err.errno or 0)}")
    if err.errno == errno.ENOENT:
        return DiskNotFound(f"{what}: no such file")
    return StorageError(f"{what}: {err}")


class RawFileBackend:
    """A raw image: ``size`` is the file's size when opened (or ``size`` if given)."""

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False,
                 size: int | None = None) -> None:
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY if readonly else os.O_RDWR)
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENOTDIR):
                raise DiskNotFound(f"disk image {self.path} does not exist") from err
            raise DiskNotFound(f"disk image {self.path} cannot be opened: {err}") from err
        self._size = os.fstat(self.fd).st_size if size is None else size
        self.readonly = readonly

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int) -> RawFileBackend:
        """A new sparse image of ``size`` bytes (all zeros, no blocks allocated), mode 0600.
        ``path`` must not exist (``O_EXCL``: nothing is ever truncated)."""
        try:
            os.close(create_file(Path(path), size))
        except OSError as err:
            raise storage_error(err, f"creating {path}") from err
        return cls(path)

    @property
    def size(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as err:
            raise storage_error(err, f"reading {self.path} at {offset}") from err
        if len(data) < length:  # past the end of a file shorter than ``size``
            data += bytes(length - len(data))
        return data

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as err:
            raise storage_error(err, f"writing {self.path} at {offset}") from err

    def flush(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as err:
            raise storage_error(err, f"fsync of {self.path}") from err

    def punch_hole(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` read as zeros, freeing its blocks where the
        file system can (else by writing zeros)."""
        if length <= 0:
            return
        if _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise storage_error(OSError(code, os.strerror(code)), f"punching {self.path}")
        end = offset + length
        while offset < end:
            n = min(_ZERO_CHUNK, end - offset)
            self.pwrite(offset, bytes(n))
            offset += n

    write_zeroes = punch_hole

    def data_extent(self, offset: int) -> tuple[int, int] | None:
        """The first data extent at or after ``offset`` as ``(start, end)`` (SEEK_DATA /
        SEEK_HOLE; clipped to ``size``), or ``None`` if only holes remain."""
        if offset >= self._size:
            return None
        try:
            start = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:
                return None
            if err.errno == errno.EINVAL:  # no SEEK_DATA here: everything is data
                return offset, self._size
            raise storage_error(err, f"seeking {self.path}") from err
        if start >= self._size:
            return None
        end = os.lseek(self.fd, start, os.SEEK_HOLE)
        return start, min(end, self._size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RawFileBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
