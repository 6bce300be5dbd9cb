"""A minimal synchronous NBD client (what the reference guest's virtual disk speaks).

    disk = NbdClient.connect("/run/xmig/disk0.sock")
    disk.pwrite(0, b"hello")       # returns once the server acknowledged the write
    assert disk.pread(0, 5) == b"hello"
    disk.flush(); disk.close()

One request at a time over a unix socket: fixed newstyle handshake, ``NBD_OPT_GO``, simple
replies. Errors: :class:`~xmig.errors.DiskNotFound` (no server at the path),
:class:`~xmig.errors.NbdProtocolError` (the server broke the protocol or went away),
:class:`NbdRequestError` (the server refused a request; ENOSPC is
:class:`~xmig.errors.DiskFull`; a range outside the export is refused with EINVAL before
anything is sent). Not thread-safe: one client per thread.
"""

from __future__ import annotations

import socket
import struct
import threading

from xmig.errors import DiskFull, DiskNotFound, NbdProtocolError, StorageError
from xmig.storage import nbd as p


class NbdRequestError(StorageError):
    """The server answered a request with an error (``errno`` is the NBD error code)."""

    def __init__(self, message: str, *, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class NbdClient:
    """A connected client; use :meth:`connect`."""

    def __init__(self, sock: socket.socket, size: int, flags: int) -> None:
        self._sock = sock
        self.size = size
        self.flags = flags
        self._handle = 0
        self._lock = threading.Lock()

    @classmethod
    def connect(cls, path: str, export: str = "", timeout: float | None = None) -> NbdClient:
        """Connect to the server on unix socket ``path`` and open ``export`` (``timeout``
        bounds each socket operation; none by default: a write may wait for the mirror)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as err:
            sock.close()
            raise DiskNotFound(f"no NBD server at {path}: {err}") from err
        except OSError as err:
            sock.close()
            raise StorageError(f"cannot connect to NBD server at {path}: {err}") from err
        try:
            size, flags = _handshake(sock, export.encode())
        except BaseException:
            sock.close()
            raise
        return cls(sock, size, flags)

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``."""
        self._check(offset, length)
        return self._request(p.CMD_READ, offset, length, b"", length)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview, *,
               fua: bool = False) -> None:
        """Write ``data`` at ``offset``; returns once the server acknowledged it."""
        self._check(offset, len(data))
        self._request(p.CMD_WRITE, offset, len(data), data, 0,
                      p.CMD_FLAG_FUA if fua else 0)

    def pwrite_batch(self, writes: list[tuple[int, bytes]]) -> int:
        """Send every write, then read the replies (the server may serve them together):
        one round trip for the batch. Returns how many writes, in order, were acknowledged
        before the first refusal; raises that refusal (typed) after reading every reply."""
        for offset, data in writes:
            self._check(offset, len(data))
        with self._lock:
            if self._sock.fileno() < 0:
                raise NbdProtocolError("the NBD client is closed")
            first = self._handle + 1
            self._handle += len(writes)
            try:
                for k, (offset, data) in enumerate(writes):
                    self._sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE,
                                                      first + k, offset, len(data)))
                    self._sock.sendall(data)
                errors: dict[int, int] = {}
                for _ in writes:
                    magic, error, got = p.SIMPLE_REPLY.unpack(
                        _recv(self._sock, p.SIMPLE_REPLY.size))
                    if magic != p.SIMPLE_REPLY_MAGIC or not first <= got < first + len(writes):
                        raise NbdProtocolError(f"bad reply (magic {magic:#x}, handle {got})")
                    errors[got - first] = error
            except (NbdProtocolError, OSError) as err:
                self._sock.close()
                if isinstance(err, NbdProtocolError):
                    raise
                raise NbdProtocolError(f"NBD connection failed: {err}") from err
        for k, (offset, data) in enumerate(writes):
            if errors.get(k):
                raise _request_error(p.CMD_WRITE, offset, len(data), errors[k])
        return len(writes)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check(offset, length)
        self._request(p.CMD_WRITE_ZEROES, offset, length, b"", 0)

    def flush(self) -> None:
        """Make every acknowledged write durable on the server."""
        self._request(p.CMD_FLUSH, 0, 0, b"", 0)

    def close(self) -> None:
        """Say goodbye (NBD_CMD_DISC) and close; idempotent."""
        if self._sock.fileno() < 0:
            return
        try:
            with self._lock:
                self._sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        finally:
            self._sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise NbdRequestError(
                f"range {offset}+{length} outside the export of {self.size} bytes",
                errno=p.EINVAL)

    def _request(self, cmd: int, offset: int, length: int,
                 data: bytes | bytearray | memoryview, want: int, flags: int = 0) -> bytes:
        with self._lock:
            if self._sock.fileno() < 0:
                raise NbdProtocolError("the NBD client is closed")
            self._handle += 1
            handle = self._handle
            try:
                self._sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, handle,
                                                  offset, length))
                if data:
                    self._sock.sendall(data)
                magic, error, got = p.SIMPLE_REPLY.unpack(_recv(self._sock,
                                                                p.SIMPLE_REPLY.size))
                if magic != p.SIMPLE_REPLY_MAGIC or got != handle:
                    raise NbdProtocolError(f"bad reply (magic {magic:#x}, handle {got})")
                if error:
                    raise _request_error(cmd, offset, length, error)
                return _recv(self._sock, want) if want else b""
            except NbdRequestError:
                raise
            except (NbdProtocolError, OSError) as err:
                self._sock.close()
                if isinstance(err, NbdProtocolError):
                    raise
                raise NbdProtocolError(f"NBD connection failed: {err}") from err


def _request_error(cmd: int, offset: int, length: int, error: int) -> StorageError:
    what = {p.CMD_READ: "READ", p.CMD_WRITE: "WRITE", p.CMD_FLUSH: "FLUSH",
            p.CMD_WRITE_ZEROES: "WRITE_ZEROES"}.get(cmd, str(cmd))
    message = f"server refused {what} of {length} bytes at {offset}: errno {error}"
    if error == p.ENOSPC:
        return DiskFull(message)
    return NbdRequestError(message, errno=error)


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise NbdProtocolError("the NBD server closed the connection")
        got += k
    return bytes(buf)


def _option(sock: socket.socket, opt: int, data: bytes) -> None:
    sock.sendall(p.OPTION.pack(p.IHAVEOPT, opt, len(data)) + data)


def _handshake(sock: socket.socket, export: bytes) -> tuple[int, int]:
    try:
        magic, opt_magic, _flags = struct.unpack(">QQH", _recv(sock, 18))
        if magic != p.NBDMAGIC or opt_magic != p.IHAVEOPT:
            raise NbdProtocolError("not a fixed-newstyle NBD server")
        sock.sendall(struct.pack(">I", p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
        _option(sock, p.OPT_GO, struct.pack(">I", len(export)) + export
                + struct.pack(">H", 0))
        size = flags = -1
        while True:
            rmagic, ropt, kind, length = p.OPTION_REPLY.unpack(_recv(sock, p.OPTION_REPLY.size))
            payload = _recv(sock, length) if length else b""
            if rmagic != p.OPT_REPLY_MAGIC or ropt != p.OPT_GO:
                raise NbdProtocolError("bad option reply")
            if kind == p.REP_INFO and len(payload) >= 12:
                (info,) = struct.unpack_from(">H", payload)
                if info == p.INFO_EXPORT:
                    _, size, flags = struct.unpack(">HQH", payload[:12])
            elif kind == p.REP_ACK:
                if size < 0:
                    raise NbdProtocolError("server sent no export size")
                return size, flags
            elif kind & (1 << 31):
                if kind == p.REP_ERR_UNKNOWN:
                    raise DiskNotFound(f"the NBD server has no export {export.decode()!r}")
                raise NbdProtocolError(f"server refused NBD_OPT_GO ({kind:#x})")
    except OSError as err:
        raise NbdProtocolError(f"NBD handshake failed: {err}") from err
