"""The destination agent's session entry points: what a new session is for, and a source
settling a migration that is not in doubt here (refused, typed, nothing changes)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.transport.stacks import make_stack, session_pair
from xmig.errors import GuestNotFound, ProtocolError
from xmig.guest.backend import Arrival, DestBackend
from xmig.guest.sim.dest import SimDest, SimDestResult
from xmig.orchestrator.destination import first_message, settle
from xmig.orchestrator.source import send_decision
from xmig.protocol import control
from xmig.protocol.journal import Journal
from xmig.transport import Channel


async def test_a_decision_for_a_migration_not_in_doubt_is_refused(tmp_path: Path) -> None:
    source_journal = Journal(tmp_path / "src" / "journal")
    source_journal.append("START", "m9", 2)
    source_journal.append("GO", "m9", 2)
    held = SimDestResult(migration="m9", epoch=1, status=Arrival.IN_DOUBT)  # another epoch
    dst_dir = tmp_path / "dst"
    in_doubt: dict[str, tuple[DestBackend, Journal]] = {
        "m9": (SimDest(workdir=dst_dir, result=held), Journal(dst_dir / "journal"))}
    with make_stack("plain", tmp_path) as stack:
        async with session_pair(stack) as (src, dst):
            async def destination() -> None:
                first = await first_message(dst)
                assert isinstance(first, control.Go)
                await settle(dst, first, in_doubt)

            agent = asyncio.create_task(destination())
            with pytest.raises(GuestNotFound, match="destination refused"):
                await send_decision(src, source_journal, "m9", timeout=10)
            with pytest.raises(GuestNotFound, match="not in doubt"):
                await agent
    assert held.status == "in-doubt"  # unchanged
    assert Journal(tmp_path / "dst" / "journal").records() == []


async def test_a_session_must_open_with_negotiate_or_a_decision(tmp_path: Path) -> None:
    with make_stack("plain", tmp_path) as stack:
        async with session_pair(stack) as (src, dst):
            await src.send(Channel.CONTROL, control.Resumed("m1", 1, 0.0).encode())
            with pytest.raises(ProtocolError, match="must open with"):
                await first_message(dst, timeout=10)
