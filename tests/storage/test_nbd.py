"""xmig's NBD server against independent clients (libnbd's nbdinfo, nbdcopy, nbdsh), raw
protocol violations, and the synchronous NbdClient."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import struct
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from tests.storage.conftest import MiB
from xmig.errors import DiskFull, DiskNotFound, NbdProtocolError
from xmig.storage import nbd as p
from xmig.storage.nbd import NbdServer
from xmig.storage.nbdclient import NbdClient, NbdRequestError
from xmig.storage.raw import RawFileBackend

needs_libnbd = pytest.mark.skipif(shutil.which("nbdcopy") is None,
                                  reason="libnbd-bin (nbdcopy, nbdinfo) not installed")
# nbdsh is "python3 -m nbd" of the system's Python (python3-libnbd), whatever python3 is first
# on PATH
NBDSH = ["/usr/bin/python3", "-m", "nbd"]
needs_nbdsh = pytest.mark.skipif(
    subprocess.run([NBDSH[0], "-c", "import nbd"], capture_output=True,
                   check=False).returncode != 0 if Path(NBDSH[0]).exists() else True,
    reason="python3-libnbd (nbdsh) not installed")


class RecordingHook:
    """A WriteHook that records writes in the order it sees them, holds each ack for a
    moment (so requests pile up in flight) and counts the most in flight at once."""

    def __init__(self, delay: float = 0.0) -> None:
        self.writes: list[tuple[int, int]] = []
        self.delay = delay
        self.active = 0
        self.max_active = 0

    async def on_write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, len(data)))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)  # simulated mirror latency, not a wait
        finally:
            self.active -= 1


class FlushCounting(RawFileBackend):
    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[NbdServer, RawFileBackend, str]]:
    img = FlushCounting.create(tmp_path / "disk.raw", 8 * MiB)
    assert isinstance(img, FlushCounting)
    server = NbdServer(img, RecordingHook())
    sock = str(tmp_path / "nbd.sock")
    await server.start_unix(sock)
    try:
        yield server, img, sock
    finally:
        await server.close()
        img.close()


async def run(*argv: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    """Run a program without blocking the event loop the server runs in."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def uri(sock: str, export: str = "xmig") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- independent clients ----------------------------------------------------------------


@needs_libnbd
async def test_nbdinfo_sees_the_export(served: tuple[NbdServer, RawFileBackend, str]) -> None:
    _, _, sock = served
    rc, out, err = await run("nbdinfo", "--json", uri(sock))
    assert rc == 0, err
    info = json.loads(out)
    exp = info["exports"][0]
    assert exp["export-size"] == 8 * MiB
    assert exp["can_flush"] and exp["can_fua"] and exp["can_zero"] and exp["can_multi_conn"]
    assert not exp["is_read_only"] and not exp["can_trim"]
    assert exp["block_size_preferred"] == 4096
    assert info["protocol"] == "newstyle-fixed" and not info["TLS"]
    rc, out, err = await run("nbdinfo", "--list", "--json", uri(sock, ""))
    assert rc == 0, err
    assert [e["export-name"] for e in json.loads(out)["exports"]] == ["xmig"]
    rc, _, err = await run("nbdinfo", uri(sock, "nope"))
    assert rc != 0, "an unknown export must be refused"


@needs_libnbd
@pytest.mark.parametrize("listener", ["unix", "tcp"])
async def test_nbdcopy_round_trip(tmp_path: Path, listener: str) -> None:
    """nbdcopy writes a random image through the server (several connections, many
    requests in flight), reads it back: digests match; the hook saw every byte."""
    size = 24 * MiB
    src = tmp_path / "src.raw"
    data = np.random.default_rng(7).bytes(size)
    src.write_bytes(data)
    img = RawFileBackend.create(tmp_path / "disk.raw", size)
    hook = RecordingHook(delay=0.001)
    async with NbdServer(img, hook) as server:
        if listener == "unix":
            await server.start_unix(tmp_path / "s.sock")
            target = uri(str(tmp_path / "s.sock"))
        else:
            port = await server.start_tcp()
            target = f"nbd://127.0.0.1:{port}/xmig"
        rc, _, err = await run("nbdcopy", "--requests=16", str(src), target)
        assert rc == 0, err
        rc, _, err = await run("nbdcopy", target, str(tmp_path / "back.raw"))
        assert rc == 0, err
    assert sha((tmp_path / "back.raw").read_bytes()) == sha(data)
    assert sha((tmp_path / "disk.raw").read_bytes()) == sha(data)
    assert sum(n for _, n in hook.writes) == size
    assert hook.max_active > 1  # requests really were in flight together
    assert server.stats.connections >= 2 and not server.errors
    img.close()


@needs_nbdsh
async def test_nbdsh_commands(served: tuple[NbdServer, RawFileBackend, str]) -> None:
    server, img, sock = served
    script = textwrap.dedent(f"""
        import errno, nbd
        h.pwrite(b"a" * 8192, 4096, nbd.CMD_FLAG_FUA)
        assert h.pread(8192, 4096) == b"a" * 8192
        h.zero(4096, 8192)  # (count, offset), as libnbd orders them
        assert h.pread(8192, 4096) == b"a" * 4096 + bytes(4096)
        h.flush()
        h.set_strict_mode(0)  # let out-of-range requests reach the server
        for call in (lambda: h.pread(4096, {8 * MiB - 1024}),
                     lambda: h.pwrite(b"x" * 4096, {8 * MiB})):
            try:
                call()
            except nbd.Error as e:
                print("refused", e.errno)  # its name, in this libnbd
            else:
                raise SystemExit("out of range request accepted")
        h.trim(4096, 0) if h.can_trim() else print("no trim")
        print("ok")
    """)
    rc, out, err = await run(*NBDSH, "-u", uri(sock), "-c", script)
    assert rc == 0, err
    assert out.split() == ["refused", "EINVAL", "refused", "ENOSPC", "no", "trim", "ok"]
    assert img.pread(0, 16384) == bytes(4096) + b"a" * 4096 + bytes(8192)
    assert isinstance(img, FlushCounting) and img.flushes >= 2  # FUA and FLUSH
    assert not server.errors


# -- protocol violations --------------------------------------------------------------


async def raw_connect(sock: str, *, go: bool = True
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(sock)
    await reader.readexactly(18)
    writer.write(struct.pack(">I", p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
    if go:
        name = b"xmig"
        writer.write(p.OPTION.pack(p.IHAVEOPT, p.OPT_GO, 4 + len(name) + 2)
                     + struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        while True:
            _, _, kind, length = p.OPTION_REPLY.unpack(await reader.readexactly(20))
            await reader.readexactly(length)
            if kind == p.REP_ACK:
                break
    return reader, writer


async def closed(reader: asyncio.StreamReader) -> bool:
    async with asyncio.timeout(5):
        return await reader.read() == b""


def request(cmd: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, handle, offset, length)


async def test_bad_request_magic_closes_and_writes_nothing(
        served: tuple[NbdServer, RawFileBackend, str]) -> None:
    server, img, sock = served
    reader, writer = await raw_connect(sock)
    bad = p.REQUEST.pack(0xDEADBEEF, 0, p.CMD_WRITE, 1, 0, 4096) + b"z" * 4096
    writer.write(bad)
    assert await closed(reader)
    writer.close()
    assert len(server.errors) == 1 and isinstance(server.errors[0], NbdProtocolError)
    assert "magic" in str(server.errors[0])
    assert img.pread(0, 4096) == bytes(4096)


async def test_oversized_write_closes_and_writes_nothing(
        served: tuple[NbdServer, RawFileBackend, str]) -> None:
    server, img, sock = served
    reader, writer = await raw_connect(sock)
    writer.write(request(p.CMD_WRITE, 1, 0, p.MAX_REQUEST + 1) + b"y" * 65536)
    assert await closed(reader)
    writer.close()
    assert isinstance(server.errors[0], NbdProtocolError)
    assert img.pread(0, 65536) == bytes(65536)


async def test_bad_option_magic_and_flags(served: tuple[NbdServer, RawFileBackend, str]) -> None:
    server, _, sock = served
    reader, writer = await raw_connect(sock, go=False)
    writer.write(p.OPTION.pack(0x1234, p.OPT_GO, 0))
    assert await closed(reader)
    writer.close()
    reader, writer = await asyncio.open_unix_connection(sock)
    await reader.readexactly(18)
    writer.write(struct.pack(">I", 0x80))  # unknown client flag
    assert await closed(reader)
    writer.close()
    assert [type(e) for e in server.errors] == [NbdProtocolError, NbdProtocolError]


async def test_bad_ranges_get_errors_and_the_connection_stays(
        served: tuple[NbdServer, RawFileBackend, str]) -> None:
    server, img, sock = served
    reader, writer = await raw_connect(sock)
    size = img.size
    writer.write(request(p.CMD_READ, 1, size - 10, 20))
    writer.write(request(p.CMD_WRITE, 2, size - 10, 20) + b"w" * 20)
    writer.write(request(p.CMD_TRIM, 3, 0, 4096))
    writer.write(request(p.CMD_READ, 4, 0, 4))
    replies = {}
    for _ in range(4):
        magic, err, handle = p.SIMPLE_REPLY.unpack(await reader.readexactly(16))
        assert magic == p.SIMPLE_REPLY_MAGIC
        replies[handle] = err
        if handle == 4 and not err:
            assert await reader.readexactly(4) == bytes(4)
    assert replies == {1: p.EINVAL, 2: p.ENOSPC, 3: p.EINVAL, 4: 0}
    writer.write(request(p.CMD_DISC, 5, 0, 0))
    assert await closed(reader)
    writer.close()
    assert not server.errors
    assert img.pread(size - 10, 10) == bytes(10)


async def test_hook_sees_pipelined_writes_in_order(
        served: tuple[NbdServer, RawFileBackend, str]) -> None:
    server, img, sock = served
    assert isinstance(server.hook, RecordingHook)
    server.hook.delay = 0.001
    reader, writer = await raw_connect(sock)
    offsets = [(i * 7919 * 512) % (img.size - 4096) for i in range(32)]
    for i, off in enumerate(offsets):
        writer.write(request(p.CMD_WRITE, i, off, 4096) + bytes([i + 1]) * 4096)
    for _ in offsets:
        _, err, _ = p.SIMPLE_REPLY.unpack(await reader.readexactly(16))
        assert err == 0
    writer.close()
    assert server.hook.writes == [(off, 4096) for off in offsets]
    assert server.hook.max_active > 1


# -- the synchronous client -----------------------------------------------------------


async def test_nbd_client(served: tuple[NbdServer, RawFileBackend, str]) -> None:
    server, img, sock = served

    def guest() -> None:
        with NbdClient.connect(sock) as c:
            assert c.size == 8 * MiB
            c.pwrite(5000, b"hello world")
            assert c.pread(5000, 11) == b"hello world"
            c.pwrite(0, b"f" * 4096, fua=True)
            c.write_zeroes(0, 2048)
            assert c.pread(0, 4096) == bytes(2048) + b"f" * 2048
            c.flush()
            with pytest.raises(NbdRequestError) as info:
                c.pread(c.size - 1, 2)
            assert info.value.errno == p.EINVAL
            assert c.pread(5000, 5) == b"hello"  # still usable

    await asyncio.to_thread(guest)
    assert img.pread(5000, 11) == b"hello world"
    assert not server.errors


async def test_nbd_client_batch_is_one_round_trip_of_ordered_writes(
        served: tuple[NbdServer, RawFileBackend, str]) -> None:
    server, img, sock = served
    writes = [(k * 4096, bytes([k + 1]) * 4096) for k in range(16)] + [(0, b"last")]

    def guest() -> None:
        with NbdClient.connect(sock) as c:
            assert c.pwrite_batch(writes) == len(writes)
            assert c.pread(0, 4) == b"last"  # later writes of a batch land later
            with pytest.raises(NbdRequestError):  # checked before anything is sent
                c.pwrite_batch([(0, b"x"), (c.size, b"y")])
            assert c.pread(0, 4) == b"last"

    await asyncio.to_thread(guest)
    assert img.pread(4096 * 15, 4096) == bytes([16]) * 4096
    assert not server.errors


async def test_nbd_client_errors(tmp_path: Path,
                                 served: tuple[NbdServer, RawFileBackend, str]) -> None:
    server, _, sock = served
    with pytest.raises(DiskNotFound):
        NbdClient.connect(str(tmp_path / "missing.sock"))
    with pytest.raises(DiskNotFound):
        await asyncio.to_thread(NbdClient.connect, sock, "no-such-export")
    c = await asyncio.to_thread(NbdClient.connect, sock)
    await server.close()  # the server goes away under the client
    with pytest.raises(NbdProtocolError):
        await asyncio.to_thread(c.pread, 0, 10)
    c.close()


def test_raw_backend_errors(tmp_path: Path) -> None:
    with pytest.raises(DiskNotFound):
        RawFileBackend(tmp_path / "nope.raw")
    img = RawFileBackend.create(tmp_path / "a.raw", 4 * MiB)
    img.pwrite(MiB, b"x" * 4096)
    start, end = img.data_extent(0) or (0, 0)
    assert start <= MiB < MiB + 4096 <= end
    assert img.data_extent(end) is None or img.data_extent(end)[0] >= end  # type: ignore[index]
    img.punch_hole(MiB, 4096)
    assert img.pread(MiB, 4096) == bytes(4096)
    img.close()


def test_raw_backend_full_is_disk_full(tmp_path: Path) -> None:
    """A write past RLIMIT_FSIZE (EFBIG) is DiskFull; run in a child so the limit (and
    SIGXFSZ, ignored there) touch nothing else."""
    code = textwrap.dedent(f"""
        import resource, signal
        from xmig.errors import DiskFull
        from xmig.storage.raw import RawFileBackend
        img = RawFileBackend.create({str(tmp_path / "f.raw")!r}, 8 << 20)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        img.pwrite(0, b"a" * 4096)
        try:
            img.pwrite(2 << 20, b"b" * 4096)
        except DiskFull as e:
            print("DiskFull", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.startswith("DiskFull"), out.stderr
    assert DiskFull.__name__ in out.stdout
