"""The NBD server's parser (``xmig.storage.nbd``): a client's bytes, from the handshake's
flags through option haggling to transmission-phase requests, driven through the server's
own handshake and transmission coroutines with an in-memory reader and writer (no socket),
in one event loop kept for the whole run.

The client going away mid-request (``IncompleteReadError`` at the end of the input) is an
outcome, as the server's connection handler treats it; anything that handler would log as a
bug (an exception other than ``NbdProtocolError``, EOF or ``ConnectionError``) is a crash."""

from __future__ import annotations

import asyncio
import random
import struct
from dataclasses import dataclass, field
from typing import cast

import xxhash

from xmig.storage import nbd
from xmig.storage.nbd import NbdServer

from .core import Target
from .mutate import bytes_mutation, extreme_int
from .t_storage import MemBackend, ZeroingMemBackend

IMAGE = 64 << 10
_LOOP: asyncio.AbstractEventLoop | None = None


class _Writer:
    """What the server uses of an ``asyncio.StreamWriter``; keeps the last replies."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        if len(self.out) > 1 << 20:
            del self.out[:]
        self.out += data

    async def drain(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        pass


class _Hook:
    """A write hook that acknowledges at once, or after a loop turn (every other write)."""

    def __init__(self) -> None:
        self.writes = 0

    async def on_write(self, offset: int, data: bytes) -> None:
        self.writes += 1

    def write_nowait(self, offset: int, data: bytes) -> asyncio.Future[None] | None:
        self.writes += 1
        if self.writes % 2:
            return None
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


async def _serve(server: NbdServer, data: bytes) -> str:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    writer = cast(asyncio.StreamWriter, _Writer())
    conn = nbd._Conn("fuzz", writer)
    try:
        if not await server._handshake(conn, reader, writer):
            return "aborted"
        await server._transmission(conn, reader, writer)
        return "disconnected"
    except asyncio.IncompleteReadError:
        return "eof"
    finally:
        if conn.tasks:
            await asyncio.gather(*conn.tasks)


def run(data: bytes) -> str:
    global _LOOP
    if _LOOP is None or _LOOP.is_closed():
        _LOOP = asyncio.new_event_loop()
    zeroing = bool(xxhash.xxh32_intdigest(data) & 1)
    backend = ZeroingMemBackend(IMAGE) if zeroing else MemBackend(IMAGE)
    server = NbdServer(backend, _Hook(), max_request=1 << 20, max_inflight=4)
    try:
        return _LOOP.run_until_complete(_serve(server, data))
    except BaseException:
        _LOOP.close()  # a crash or the alarm may leave tasks behind: start afresh
        raise


def close() -> None:
    """Close the run's event loop (a test calls this; a fuzz run just exits)."""
    if _LOOP is not None:
        _LOOP.close()


# -- the client's side, as fields --------------------------------------------------------

_OPT_HEAD = struct.Struct(">QII")
_REQ_HEAD = struct.Struct(">IHHQQI")


@dataclass
class Option:
    opt: int
    data: bytes = b""
    magic: int = nbd.IHAVEOPT
    length: int | None = None

    def encode(self) -> bytes:
        n = len(self.data) if self.length is None else self.length
        return _OPT_HEAD.pack(self.magic, self.opt, n) + self.data


@dataclass
class Request:
    cmd: int
    offset: int = 0
    length: int = 0
    payload: bytes = b""
    flags: int = 0
    handle: int = 1
    magic: int = nbd.REQUEST_MAGIC

    def encode(self) -> bytes:
        return _REQ_HEAD.pack(self.magic, self.flags, self.cmd, self.handle, self.offset,
                              self.length) + self.payload


@dataclass
class Client:
    flags: int = nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES
    options: list[Option] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    rest: bytes = b""

    def encode(self) -> bytes:
        return (struct.pack(">I", self.flags) + b"".join(o.encode() for o in self.options)
                + b"".join(r.encode() for r in self.requests) + self.rest)


def parse(data: bytes) -> Client:
    """A client's bytes as fields (what does not parse goes to ``rest``)."""
    c = Client(struct.unpack_from(">I", data)[0] if len(data) >= 4 else 0, rest=data[4:])
    pos = 4
    while pos + _OPT_HEAD.size <= len(data) and len(c.options) < 32:
        magic, opt, n = _OPT_HEAD.unpack_from(data, pos)
        if pos + _OPT_HEAD.size + n > len(data):
            break
        c.options.append(Option(opt, data[pos + 16:pos + 16 + n], magic))
        pos += _OPT_HEAD.size + n
        if opt in (nbd.OPT_GO, nbd.OPT_EXPORT_NAME, nbd.OPT_ABORT):
            break
    while pos + _REQ_HEAD.size <= len(data) and len(c.requests) < 64:
        magic, flags, cmd, handle, offset, n = _REQ_HEAD.unpack_from(data, pos)
        pos += _REQ_HEAD.size
        payload = data[pos:pos + n] if cmd == nbd.CMD_WRITE else b""
        pos += len(payload)
        c.requests.append(Request(cmd, offset, n, payload, flags, handle, magic))
    c.rest = data[pos:] if len(data) >= 4 else data
    return c


def _info(name: bytes = b"xmig", *infos: int) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(f">H{len(infos)}H", len(infos),
                                                             *infos)


def _seed_clients() -> list[Client]:
    go = Option(nbd.OPT_GO, _info(b"xmig", nbd.INFO_BLOCK_SIZE, nbd.INFO_NAME))
    rw = [Request(nbd.CMD_WRITE, 4096, 5, b"hello", handle=1),
          Request(nbd.CMD_READ, 4096, 5, handle=2),
          Request(nbd.CMD_WRITE_ZEROES, 0, 8192, flags=nbd.CMD_FLAG_FUA, handle=3),
          Request(nbd.CMD_WRITE, 100, 3, b"abc", flags=nbd.CMD_FLAG_FUA, handle=4),
          Request(nbd.CMD_FLUSH, handle=5), Request(nbd.CMD_TRIM, 0, 512, handle=6),
          Request(nbd.CMD_DISC)]
    return [
        Client(options=[Option(nbd.OPT_STRUCTURED_REPLY), Option(nbd.OPT_LIST),
                        Option(nbd.OPT_INFO, _info(b"xmig", nbd.INFO_DESCRIPTION)), go],
               requests=rw),
        Client(flags=nbd.FLAG_FIXED_NEWSTYLE, options=[Option(nbd.OPT_EXPORT_NAME, b"")],
               requests=[*rw[:2], Request(nbd.CMD_DISC)]),
        Client(options=[Option(nbd.OPT_GO, _info(b"other")), Option(nbd.OPT_ABORT)]),
        Client(options=[Option(nbd.OPT_STARTTLS), go], requests=rw[2:]),
    ]


def seeds() -> list[bytes]:
    return [c.encode() for c in _seed_clients()]


def _mutate_item(c: Client, rng: random.Random) -> None:
    items: list[Option | Request] = [*c.options, *c.requests]
    if not items:
        c.rest = bytes_mutation(c.rest, rng)
        return
    it = rng.choice(items)
    names = ["magic", "length", "opt", "data"] if isinstance(it, Option) else [
        "magic", "flags", "cmd", "offset", "length", "payload"]
    name = rng.choice(names)
    width = {"magic": 8 if isinstance(it, Option) else 4, "flags": 2, "cmd": 2, "opt": 4,
             "offset": 8, "length": 4}.get(name, 0)
    if name in ("data", "payload"):
        setattr(it, name, bytes_mutation(getattr(it, name), rng, max_len=1 << 17))
    elif name in ("cmd", "opt") and rng.random() < 0.7:
        setattr(it, name, rng.choice((0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0xFFFF)))
    else:
        cur = getattr(it, name) or 0
        setattr(it, name, extreme_int(rng, width, cur, IMAGE))
        if isinstance(it, Request) and name == "length" and it.cmd == nbd.CMD_WRITE and (
                rng.random() < 0.5 and it.length < 1 << 17):
            it.payload = rng.randbytes(it.length)


def mutate(data: bytes, rng: random.Random) -> bytes:
    """Structure-aware: one field of an option or request (its lengths kept consistent
    unless the length itself is the field), or add, drop, repeat items, or the flags."""
    c = parse(data)
    op = rng.random()
    if op < 0.6:
        _mutate_item(c, rng)
    elif op < 0.7:
        c.flags = extreme_int(rng, 4, c.flags)
    elif op < 0.8 and c.requests:
        k = rng.randrange(len(c.requests))
        c.requests[k:k] = [c.requests[k]] * rng.choice((1, 10, 100))
    elif op < 0.9 and c.options:
        k = rng.randrange(len(c.options))
        c.options[k:k] = [c.options[k]] * rng.choice((1, 10, 100))
    else:
        seed = rng.choice(_seed_clients())
        c.requests += seed.requests[:rng.randrange(len(seed.requests) + 1)]
    return c.encode()


def nasty() -> list[bytes]:
    go = Option(nbd.OPT_GO, _info()).encode()
    flags = struct.pack(">I", 3)
    huge_opt = _OPT_HEAD.pack(nbd.IHAVEOPT, nbd.OPT_INFO, (1 << 32) - 1)
    big_info = Option(nbd.OPT_INFO, struct.pack(">I", (1 << 32) - 1) + b"x" * 10).encode()
    reqs = [Request(nbd.CMD_WRITE, 0, (1 << 32) - 1), Request(nbd.CMD_READ, 0, (1 << 32) - 1),
            Request(nbd.CMD_WRITE_ZEROES, (1 << 64) - 1, 2),
            Request(nbd.CMD_READ, (1 << 64) - 4096, 4096),
            Request(nbd.CMD_WRITE_ZEROES, 0, (1 << 32) - 1, flags=1)]
    flood = b"".join(Request(nbd.CMD_FLUSH, handle=i).encode() for i in range(2000))
    return [flags + huge_opt, flags + big_info + go, flags + go + flood,
            *(flags + go + r.encode() for r in reqs), flags + go * 2000, b"\xff" * 4]


TARGETS = [Target("nbd", run, seeds, mutate, None, nasty, max_len=1 << 18)]
