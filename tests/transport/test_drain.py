"""``drain(channel)``: a last control message is known read by the peer even while bulk data
it has not consumed fills the other channels (an ABORT before the session is left)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.transport.stacks import make_stack, session_pair
from xmig.transport import Channel


async def test_drain_of_one_channel_waits_for_it_alone(tmp_path: Path) -> None:
    with make_stack("tls", tmp_path) as stack:
        async with session_pair(stack) as (src, dst):
            for _ in range(64):  # 64 MiB of memory pages the peer never reads
                await src.send(Channel.MEMORY, bytes(1 << 20))
            await src.send(Channel.CONTROL, b"abort")
            assert await asyncio.wait_for(dst.recv(Channel.CONTROL), 30) == b"abort"
            async with asyncio.timeout(10):
                await src.drain(Channel.CONTROL)  # the peer read it: acknowledged
            assert src.session.send_channels[Channel.CONTROL].idle
            assert not src.session.all_acked  # the pages are still unread
