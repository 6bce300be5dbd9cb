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
from xmig.orchestrator.probe import answer_probe, probe_link
from xmig.orchestrator.source import send_decision
from xmig.protocol import control
from xmig.protocol.journal import Journal
from xmig.transport import Channel, SessionConfig


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


async def test_a_probe_measures_the_link_and_the_agent_drops_what_it_sent(tmp_path: Path,
                                                                           ) -> None:
    # capped at 80 Mbit/s on loopback: the probe's rate is the cap's, within its bursts
    config = SessionConfig(rate_cap_bps=80e6)
    with make_stack("plain", tmp_path) as stack:
        async with session_pair(stack, config=config) as (src, dst):
            async def agent() -> int:
                first = await first_message(dst)
                assert isinstance(first, control.Probe) and first.seconds == 1.0
                return await answer_probe(dst, first)

            answering = asyncio.create_task(agent())
            sample = await probe_link(src, 1.0)
            dropped = await answering
    assert dropped == sample.sent_bytes == sample.received_bytes > 0
    assert 0.4 * 10e6 < sample.rate_Bps < 1.3 * 10e6
    assert 0 < sample.rtt_s < 0.05 and sample.seconds >= 1.0


async def test_a_probe_that_goes_on_with_anything_but_its_end_is_a_protocol_error(
        tmp_path: Path) -> None:
    with make_stack("plain", tmp_path) as stack:
        async with session_pair(stack) as (src, dst):
            await src.send(Channel.CONTROL, control.Probe(seconds=1.0).encode())
            await src.send(Channel.DISK_BULK, bytes(1000))
            await src.send(Channel.CONTROL, control.Go("m1", 1, "").encode())
            first = await first_message(dst)
            assert isinstance(first, control.Probe)
            with pytest.raises(ProtocolError, match="expected probe-end, got go"):
                await answer_probe(dst, first)
