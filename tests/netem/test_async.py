"""The link from asyncio code: sockets made in the hosts, handed to asyncio streams."""

from __future__ import annotations

import asyncio
import time
import warnings

import pytest

from xmig.netem import LinkSpec, Wan


@pytest.mark.parametrize("mode", [pytest.param("tun", marks=pytest.mark.root), "relay"])
async def test_asyncio_streams_across_the_link(mode: str) -> None:
    spec = LinkSpec.symmetric(rate_bps=100_000_000, rtt_s=0.030)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        link = Wan(spec, fallback=mode)  # type: ignore[arg-type]
    with link:
        listener = link.socket("dst")
        listener.bind(("0.0.0.0", 0))
        listener.listen()
        listener.setblocking(False)

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, sock=listener)
        async with server:
            sock = link.socket("src")
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(sock, link.dst_endpoint(listener.getsockname()[1]))
            reader, writer = await asyncio.open_connection(sock=sock)
            start = time.monotonic()
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
            assert time.monotonic() - start >= 0.029

            link.cut()
            writer.write(b"cut")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.readexactly(3), 0.4)
            link.restore()
            assert await asyncio.wait_for(reader.readexactly(3), 5) == b"cut"
            writer.close()
            await writer.wait_closed()
