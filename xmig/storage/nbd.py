"""xmig's NBD server: the storage interception point (asyncio, unix socket or TCP).

The protocol subset QEMU and libnbd use: fixed newstyle handshake; options ``GO``, ``INFO``
(export size and flags, name, description, block sizes), ``EXPORT_NAME``, ``LIST``,
``ABORT``; ``STRUCTURED_REPLY``, ``STARTTLS`` and meta contexts are refused (``ERR_UNSUP``),
so every reply is a simple reply. Commands: READ, WRITE (with FUA), FLUSH, WRITE_ZEROES,
DISC. ``CAN_MULTI_CONN`` is advertised: one event loop serves every connection, and FLUSH is
an fsync of the whole image.

Each WRITE is written to the backend synchronously, in arrival order, then handed to the
:class:`~xmig.storage.disk.WriteHook` in a task started at once (tasks start in creation
order, so the hook sees writes in the order they reached the disk); the reply -- the
guest's acknowledgement -- goes out when the hook's awaitable completes (and, with FUA,
the fsync). A protocol violation (bad magic, an oversized WRITE, a malformed option) is an
:class:`~xmig.errors.NbdProtocolError`, recorded in :attr:`NbdServer.errors`, and the
connection is closed with nothing written. Bad ranges get the errno the spec asks for.

Why xmig's own and not nbdkit or qemu-nbd: the server is where the asynchronous mirror
lives -- each write's acknowledgement is held or released by the mirror's congestion
control, in the same event loop as the session that ships it. qemu-nbd has no such hook;
an nbdkit filter would need a plugin in C or Python inside another process, and a second
queue between it and the session. The protocol subset is small, and libnbd's ``nbdcopy``
and ``nbdsh`` check it (tests/storage).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import struct
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from xmig.errors import DiskFull, NbdProtocolError, StorageError
from xmig.private import unix_listener
from xmig.storage.disk import BlockBackend, WriteHook

log = logging.getLogger(__name__)

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

TF_HAS_FLAGS = 1 << 0
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_WRITE_ZEROES = 1 << 6
TF_CAN_MULTI_CONN = 1 << 8

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1

EPERM, EIO, EINVAL, ENOSPC = 1, 5, 22, 28

REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
OPTION = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")

MAX_REQUEST = 32 << 20  #: longest READ or WRITE payload (and the advertised maximum)
MAX_OPTION = 64 << 10  #: longest option data accepted in the handshake
ZERO_CHUNK = 1 << 20
_ZEROS = bytes(ZERO_CHUNK)


@runtime_checkable
class ZeroingBackend(Protocol):
    """A backend that can zero a range without a buffer (``fallocate`` punch)."""

    def write_zeroes(self, offset: int, length: int) -> None: ...


def zero_chunks(offset: int, length: int) -> list[tuple[int, bytes]]:
    """``[offset, offset+length)`` as zero-filled writes of at most :data:`ZERO_CHUNK` bytes,
    sharing one buffer (how WRITE_ZEROES reaches a :class:`WriteHook`)."""
    out = []
    end = offset + length
    while offset < end:
        n = min(ZERO_CHUNK, end - offset)
        out.append((offset, _ZEROS if n == ZERO_CHUNK else _ZEROS[:n]))
        offset += n
    return out


@dataclass
class NbdStats:
    connections: int = 0
    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    flushes: int = 0
    errors_replied: int = 0


@dataclass(eq=False)
class _Conn:
    peer: str
    writer: asyncio.StreamWriter
    no_zeroes: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class NbdServer:
    """Exports one :class:`BlockBackend` under ``name`` (the empty name works too)."""

    def __init__(self, backend: BlockBackend, hook: WriteHook | None = None, *,
                 name: str = "xmig", description: str = "xmig disk",
                 max_request: int = MAX_REQUEST, max_inflight: int = 64) -> None:
        self.backend = backend
        self.hook = hook
        self.name = name
        self.description = description
        self.max_request = max_request
        self.max_inflight = max_inflight
        self.errors: list[StorageError] = []  #: protocol violations seen, one per connection
        self.stats = NbdStats()
        self._servers: list[asyncio.Server] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._conns: set[_Conn] = set()
        self._unix_paths: list[Path] = []

    # -- listeners ----------------------------------------------------------------------

    async def start_unix(self, path: str | os.PathLike[str]) -> None:
        """Listen on a unix socket, mode 0600 (a stale socket file at ``path`` is replaced;
        any other file there is a ConfigError)."""
        p = Path(path)
        _remove_stale_socket(p)
        self._servers.append(await asyncio.start_unix_server(self._accept,
                                                             sock=unix_listener(p)))
        self._unix_paths.append(p)

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on TCP; returns the port."""
        server = await asyncio.start_server(self._accept, host, port)
        self._servers.append(server)
        bound: int = server.sockets[0].getsockname()[1]
        return bound

    async def close(self) -> None:
        """Stop listening and close every connection."""
        for server in self._servers:
            server.close()
        for conn in list(self._conns):  # the handler sees EOF and ends by itself
            conn.writer.close()
            for task in list(conn.tasks):  # requests waiting on the hook are abandoned
                task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        for p in self._unix_paths:
            _remove_stale_socket(p)

    async def __aenter__(self) -> NbdServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def transmission_flags(self) -> int:
        return (TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_WRITE_ZEROES
                | TF_CAN_MULTI_CONN)

    # -- one connection -----------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        peer = str(writer.get_extra_info("peername") or "unix")
        conn = _Conn(peer, writer)
        self._conns.add(conn)
        self.stats.connections += 1
        try:
            if await self._handshake(conn, reader, writer):
                await self._transmission(conn, reader, writer)
        except NbdProtocolError as err:
            log.warning("NBD client %s: %s; closing", peer, err)
            self.errors.append(err)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away; in-flight work still completes below
        except Exception:  # a bug: close this connection, keep serving the others
            log.exception("NBD connection from %s failed", peer)
        finally:
            if conn.tasks:
                await asyncio.gather(*conn.tasks, return_exceptions=True)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._conns.discard(conn)
            self._handlers.discard(task)

    async def _handshake(self, conn: _Conn, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> bool:
        """Options until GO/EXPORT_NAME (True) or ABORT (False)."""
        writer.write(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", await reader.readexactly(4))
        if client_flags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
            raise NbdProtocolError(f"unknown client flags {client_flags:#x}")
        if not client_flags & FLAG_FIXED_NEWSTYLE:
            raise NbdProtocolError("client does not speak fixed newstyle")
        conn.no_zeroes = bool(client_flags & FLAG_NO_ZEROES)
        while True:
            magic, opt, length = OPTION.unpack(await reader.readexactly(OPTION.size))
            if magic != IHAVEOPT:
                raise NbdProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION:
                raise NbdProtocolError(f"option {opt} of {length} bytes")
            data = await reader.readexactly(length)

            def reply(kind: int, payload: bytes = b"", opt: int = opt) -> None:
                writer.write(OPTION_REPLY.pack(OPT_REPLY_MAGIC, opt, kind, len(payload)) + payload)

            if opt == OPT_EXPORT_NAME:
                if not self._known(data):
                    raise NbdProtocolError(f"unknown export {data!r}")
                tail = b"" if conn.no_zeroes else bytes(124)
                writer.write(struct.pack(">QH", self.backend.size, self.transmission_flags) + tail)
                await writer.drain()
                return True
            if opt == OPT_ABORT:
                reply(REP_ACK)
                await writer.drain()
                return False
            if opt == OPT_LIST:
                if data:
                    reply(REP_ERR_INVALID)
                else:
                    name = self.name.encode()
                    reply(REP_SERVER, struct.pack(">I", len(name)) + name)
                    reply(REP_ACK)
            elif opt in (OPT_INFO, OPT_GO):
                requests = self._parse_info(data)
                if requests is None:
                    reply(REP_ERR_INVALID)
                elif not self._known(requests[0]):
                    reply(REP_ERR_UNKNOWN)
                else:
                    self._send_info(reply, requests[1])
                    reply(REP_ACK)
                    if opt == OPT_GO:
                        await writer.drain()
                        return True
            else:  # STRUCTURED_REPLY, STARTTLS, meta contexts, anything newer
                reply(REP_ERR_UNSUP)
            await writer.drain()

    def _known(self, name: bytes) -> bool:
        return name in (b"", self.name.encode())

    @staticmethod
    def _parse_info(data: bytes) -> tuple[bytes, list[int]] | None:
        if len(data) < 6:
            return None
        (nlen,) = struct.unpack_from(">I", data)
        if len(data) < 4 + nlen + 2:
            return None
        name = data[4:4 + nlen]
        (count,) = struct.unpack_from(">H", data, 4 + nlen)
        rest = data[6 + nlen:]
        if len(rest) != 2 * count:
            return None
        return name, list(struct.unpack(f">{count}H", rest))

    def _send_info(self, reply: _Reply, requested: list[int]) -> None:
        reply(REP_INFO, struct.pack(">HQH", INFO_EXPORT, self.backend.size,
                                    self.transmission_flags))
        if INFO_NAME in requested:
            reply(REP_INFO, struct.pack(">H", INFO_NAME) + self.name.encode())
        if INFO_DESCRIPTION in requested:
            reply(REP_INFO, struct.pack(">H", INFO_DESCRIPTION) + self.description.encode())
        if INFO_BLOCK_SIZE in requested:
            reply(REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, self.max_request))

    async def _transmission(self, conn: _Conn, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        size = self.backend.size
        slots = asyncio.Semaphore(self.max_inflight)

        def send_reply(error: int, handle: int, data: bytes = b"") -> None:
            if error:
                self.stats.errors_replied += 1
            if not writer.is_closing():
                writer.write(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle))
                if data:
                    writer.write(data)

        def spawn(work: Awaitable[int], handle: int) -> None:
            async def run() -> None:
                try:
                    err = await work
                except Exception as e:  # the reply says EIO; the server goes on
                    log.warning("NBD request failed: %s", e)
                    err = ENOSPC if isinstance(e, DiskFull) else EIO
                finally:
                    slots.release()
                send_reply(err, handle)

            task = asyncio.create_task(run())
            conn.tasks.add(task)
            task.add_done_callback(conn.tasks.discard)

        while True:
            hdr = await reader.readexactly(REQUEST.size)
            magic, flags, cmd, handle, offset, length = REQUEST.unpack(hdr)
            if magic != REQUEST_MAGIC:
                raise NbdProtocolError(f"bad request magic {magic:#x} from {conn.peer}")
            if cmd == CMD_WRITE and length > self.max_request:
                raise NbdProtocolError(
                    f"WRITE of {length} bytes > maximum {self.max_request} from {conn.peer}")
            payload = await reader.readexactly(length) if cmd == CMD_WRITE else b""
            in_range = offset + length <= size
            if cmd == CMD_DISC:
                return
            await slots.acquire()
            if cmd == CMD_READ:
                slots.release()
                if length > self.max_request or not in_range:
                    send_reply(EINVAL, handle)
                    continue
                try:
                    data = self.backend.pread(offset, length) if length else b""
                except StorageError as e:
                    log.warning("NBD read failed: %s", e)
                    send_reply(EIO, handle)
                    continue
                self.stats.reads += 1
                self.stats.bytes_read += length
                send_reply(0, handle, data)
                await writer.drain()
            elif cmd in (CMD_WRITE, CMD_WRITE_ZEROES):
                if not in_range:
                    slots.release()
                    send_reply(ENOSPC, handle)
                    continue
                try:
                    work = self._write(cmd, offset, length, payload, flags)
                    if work is None:
                        slots.release()
                        send_reply(0, handle)
                    else:
                        spawn(work, handle)
                except StorageError as e:  # the local write failed: nothing to mirror
                    slots.release()
                    log.warning("NBD write failed: %s", e)
                    send_reply(ENOSPC if isinstance(e, DiskFull) else EIO, handle)
            elif cmd == CMD_FLUSH:
                spawn(self._flush(), handle)
            else:  # TRIM (not advertised), CACHE, BLOCK_STATUS, ...
                slots.release()
                send_reply(EINVAL, handle)

    def _write(self, cmd: int, offset: int, length: int, data: bytes,
               flags: int) -> Awaitable[int] | None:
        """Write locally now (raises StorageError), give the write to the hook now; the
        awaitable completes when the guest may be acknowledged (None: at once)."""
        if cmd == CMD_WRITE:
            if length:
                self.backend.pwrite(offset, data)
            pieces = [(offset, data)] if length else []
        else:
            if isinstance(self.backend, ZeroingBackend):
                self.backend.write_zeroes(offset, length)
            else:
                for off, chunk in zero_chunks(offset, length):
                    self.backend.pwrite(off, chunk)
            pieces = zero_chunks(offset, length)
        self.stats.writes += 1
        self.stats.bytes_written += length
        waits: list[Awaitable[None]] = []
        if self.hook is not None:
            nowait = getattr(self.hook, "write_nowait", None)
            for off, chunk in pieces:
                if nowait is not None:  # bookkeeping now; often nothing to wait for
                    if (w := nowait(off, chunk)) is not None:
                        waits.append(w)
                else:  # tasks start in creation order, so the hook sees write order
                    waits.append(asyncio.ensure_future(self.hook.on_write(off, chunk)))
        if not waits and not flags & CMD_FLAG_FUA:
            return None

        async def complete() -> int:
            for w in waits:
                await w
            if flags & CMD_FLAG_FUA:
                await asyncio.to_thread(self.backend.flush)
            return 0

        return complete()

    async def _flush(self) -> int:
        self.stats.flushes += 1
        await asyncio.to_thread(self.backend.flush)
        return 0


def _remove_stale_socket(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)


class _Reply(Protocol):
    def __call__(self, kind: int, payload: bytes = b"", opt: int = ...) -> None: ...
