"""The stream tunnel, the bandwidth governor and the RAM check without QEMU: fake QEMU ends
on unix sockets, a plaintext session on loopback."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from xmig.errors import ProtocolError, QemuError
from xmig.guest.qemu import ramcheck
from xmig.guest.qemu.stream import CHUNK, BandwidthGovernor, DestTunnel, Meter, SourceTunnel
from xmig.transport import TransportSession

from .helpers import loopback_sessions


@pytest_asyncio.fixture
async def pair() -> AsyncIterator[tuple[TransportSession, TransportSession]]:
    async with loopback_sessions() as sessions:
        yield sessions


async def test_tunnel_carries_both_directions_in_order(
    pair: tuple[TransportSession, TransportSession], tmp_path: Path
) -> None:
    src_session, dst_session = pair
    rng = random.Random(7)
    stream = rng.randbytes(3 << 20)
    back = rng.randbytes(5000)
    got_in_dest = bytearray()

    async def dest_qemu(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while len(got_in_dest) < len(stream):
            got_in_dest.extend(await reader.read(1 << 16))
        writer.write(back)  # the return path
        await writer.drain()
        writer.close()

    incoming = tmp_path / "in.sock"
    server = await asyncio.start_unix_server(dest_qemu, str(incoming))
    source = SourceTunnel(src_session, tmp_path / "out.sock", chunk=100_000)
    dest = DestTunnel(dst_session, incoming)
    await source.start()
    await dest.start()
    reader, writer = await asyncio.open_unix_connection(str(source.path))  # the source QEMU
    for i in range(0, len(stream), 70_000):
        writer.write(stream[i:i + 70_000])
    await writer.drain()
    async with asyncio.timeout(20):
        returned = await reader.readexactly(len(back))
        await dest.wait_received_bytes(len(stream))
        await source._until(source.received_eof)  # the destination QEMU closed its end
    writer.close()
    async with asyncio.timeout(20):
        await source.wait_sent()
        await dest._until(dest.received_eof)
    assert bytes(got_in_dest) == stream and returned == back
    assert source.sent.bytes == dest.received.bytes == len(stream)
    assert dest.sent.bytes == source.received.bytes == len(back)
    assert max(source.sent.chunks, 1) >= len(stream) // 100_000
    await source.close()
    await dest.close()
    server.close()


async def test_sever_fails_a_write_blocked_in_a_stalled_tunnel_with_epipe(
    pair: tuple[TransportSession, TransportSession], tmp_path: Path
) -> None:
    """The destination never reads the memory channel: the session's window fills, the
    tunnel stops reading and the source QEMU (a thread here) blocks in send(). sever()
    wakes that write with EPIPE, QEMU's broken-network path (not a reset), and keeps our
    end open until close()."""
    src_session, _ = pair  # the destination's end is never read
    tunnel = SourceTunnel(src_session, tmp_path / "out.sock", chunk=CHUNK)
    await tunnel.start()
    blocked = threading.Event()

    def qemu() -> OSError:
        data = bytes(1 << 20)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(tunnel.path))
            sock.settimeout(0.5)
            while True:
                try:
                    sock.sendall(data)
                except TimeoutError:  # a write blocked for 0.5 s: the tunnel is stalled
                    blocked.set()
                    sock.settimeout(None)
                except OSError as err:
                    return err

    writing = asyncio.ensure_future(asyncio.to_thread(qemu))
    try:
        assert await asyncio.to_thread(blocked.wait, 30), "the writer never blocked"
        assert not writing.done()
        stalled_at = tunnel.sent.bytes
        await tunnel.sever()
        async with asyncio.timeout(10):
            err = await writing
        assert isinstance(err, BrokenPipeError), err
        assert tunnel.sent.bytes == stalled_at  # nothing more was carried
        assert tunnel._writer is not None
        ours = tunnel._writer.get_extra_info("socket")
        assert ours.fileno() >= 0  # shut down, still open: closed by close() only
    finally:
        await tunnel.close()
        await asyncio.wait([writing])
    assert ours.fileno() == -1


async def test_dest_tunnel_without_qemu_is_a_typed_error(
    pair: tuple[TransportSession, TransportSession], tmp_path: Path
) -> None:
    with pytest.raises(QemuError, match="incoming socket"):
        await DestTunnel(pair[1], tmp_path / "nobody.sock").start(timeout=1)


def test_meter_rates() -> None:
    m = Meter(window_s=1.0)
    for i in range(11):
        m.add(1000, 100.0 + i * 0.1)
    assert m.bytes == 11_000 and m.chunks == 11
    assert m.rate(101.0) == pytest.approx(10_000, rel=0.01)
    assert m.average() == pytest.approx(11_000, rel=0.01)


class FakeQmp:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def execute(self, command: str, arguments: dict[str, object] | None = None) -> object:
        self.calls.append((command, arguments))
        return {}


class FakeChannel:
    def __init__(self, backlog: int) -> None:
        self.pending_bytes, self.inflight_bytes = 0, backlog


class FakeSession:
    def __init__(self, rate: float, srtt: float, backlog: int) -> None:
        self.rate, self.srtt = rate, srtt
        self.session = self
        self.send_channels = {3: FakeChannel(backlog)}

    def stats(self) -> dict[str, Any]:
        return {"delivery_rate_Bps": self.rate, "srtt_s": self.srtt}


@pytest.mark.parametrize(
    ("backlog", "expected"),
    [(100_000, 12_500_000), (1_000_000, 10_000_000), (5_000_000, 8_000_000)],
)
async def test_governor_probes_holds_and_drains(backlog: int, expected: int) -> None:
    """10 MB/s × 50 ms: one BDP is 500 kB; under a BDP (+256 KiB) it probes ×1.25, over
    two BDPs + 1 MiB it drains ×0.8, in between it follows the rate."""
    qmp = FakeQmp()
    session: Any = FakeSession(10e6, 0.05, backlog)
    gov = BandwidthGovernor(qmp, session, initial_Bps=None)
    await gov.apply()
    assert qmp.calls == [("migrate-set-parameters", {"max-bandwidth": expected})]
    await gov.apply()  # unchanged: not sent again
    assert len(qmp.calls) == 1


async def test_governor_waits_for_an_estimate() -> None:
    qmp = FakeQmp()
    session: Any = FakeSession(0.0, 0.0, 0)
    await BandwidthGovernor(qmp, session).apply()
    assert qmp.calls == []
    await BandwidthGovernor(qmp, session, initial_Bps=5e6).apply()
    assert qmp.calls == [("migrate-set-parameters", {"max-bandwidth": 5_000_000})]


def test_ram_check_finds_and_repairs_stale_chunks(tmp_path: Path) -> None:
    rng = random.Random(3)
    size = 1 << 20
    src, dst = tmp_path / "src.ram", tmp_path / "dst.ram"
    data = bytearray(rng.randbytes(size))
    src.write_bytes(data)
    data[5000] ^= 0xFF  # chunk 0
    data[size - 1] ^= 0x01  # the last chunk
    dst.write_bytes(data)
    mine = ramcheck.ram_digests(src)
    theirs = ramcheck.decode_digests(ramcheck.encode_digests(ramcheck.ram_digests(dst)))
    stale = ramcheck.differing(mine, theirs)
    assert list(stale) == [0, size // ramcheck.CHUNK - 1]
    fix = ramcheck.encode_fixups(src, stale, message_bytes=ramcheck.CHUNK)  # one per message
    assert len(fix) == 2
    assert [ramcheck.apply_fixups(dst, f) for f in fix] == [(1, True), (1, False)]
    assert dst.read_bytes() == src.read_bytes()
    assert not ramcheck.differing(mine, ramcheck.ram_digests(dst)).size
    (empty,) = ramcheck.encode_fixups(src, np.array([], np.int64))
    assert ramcheck.apply_fixups(dst, empty) == (0, False)
    with pytest.raises(ProtocolError):
        ramcheck.apply_fixups(dst, fix[0][:-1])
    with pytest.raises(QemuError, match="sizes differ"):
        ramcheck.differing(mine, mine[:-1])
    with pytest.raises(ProtocolError):
        ramcheck.decode_digests("!!")
