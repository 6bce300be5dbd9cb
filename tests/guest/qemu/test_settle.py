"""A QEMU migration left in doubt is settled by the source's journaled decision.

The link is cut as the source journals GO (after READY, before GO reaches the destination)
and stays cut past the session's resume deadline: the destination raises InDoubt and keeps
its QEMU paused; the source has GO in its journal and never runs its QEMU again. With the
link back, the source opens a new session with its decision and sends the RAM repair again;
the destination runs the guest, whose counter continues from the source's."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from tests.transport.stacks import make_stack, session_pair
from xmig.errors import GuestNotFound, InDoubt
from xmig.events import BlackoutStep, Event
from xmig.guest.backend import Arrival
from xmig.guest.qemu import QemuGuest
from xmig.guest.qemu.image import GuestImage
from xmig.guest.qemu.migrate import QemuMigrationOptions
from xmig.guest.qemu.receive import QemuDest, QemuDestResult
from xmig.netem import Wan
from xmig.netem.sessions import connect_across, listen_across
from xmig.orchestrator.destination import first_message, settle
from xmig.orchestrator.qemusettle import send_qemu_decision
from xmig.orchestrator.run import migrate_qemu, receive_qemu
from xmig.protocol import control
from xmig.protocol.journal import Journal
from xmig.transport import SessionConfig
from xmig.transport.certs import init_pki
from xmig.transport.tls import client_context, server_context

from .test_migrate import BOOT_S, LINK, drain_console, guest_config

pytestmark = [pytest.mark.root, pytest.mark.qemu, pytest.mark.slow]

SHORT = SessionConfig(idle_timeout=1.0, resume_deadline=3.0)


async def test_a_destination_in_doubt_runs_the_guest_on_the_sources_journaled_go(
        guest_image: GuestImage, tmp_path: Path) -> None:
    config = guest_config(guest_image, "mem", mem_mb=16, mem_rate=2)
    template = guest_config(guest_image, "mem", name="dst")
    src_journal, dst_journal = Journal(tmp_path / "src.journal"), Journal(tmp_path / "dst.j")
    async with await QemuGuest.launch(config, tmp_path / "src") as source:
        await source.wait_for_progress(BOOT_S, min_counter=1)
        with Wan(LINK) as wan:
            pki = init_pki(tmp_path / "pki", server_names=(wan.dst_addr,))

            def cut_before_go(event: Event) -> None:
                if isinstance(event, BlackoutStep) and event.step == "ram checked":
                    # GO is journaled next, then sent
                    wan.cut()

            async with (listen_across(wan, tls=server_context(pki), config=SHORT) as lst,
                        connect_across(wan, lst.port, tls=client_context(pki),
                                       config=SHORT) as src_session):
                dst_session = await lst.accept()
                receiving = asyncio.create_task(receive_qemu(
                    dst_session, template, workdir=tmp_path / "dst", journal=dst_journal,
                    reply_timeout_s=60))
                src = await migrate_qemu(
                    src_session, source, migration="q1", journal=src_journal,
                    workdir=tmp_path / "src", on_progress=cut_before_go,
                    options=QemuMigrationOptions(reply_timeout_s=8))
                with pytest.raises(InDoubt) as caught:
                    async with asyncio.timeout(60):
                        await receiving
            held = caught.value.result
            assert isinstance(held, QemuDestResult) and held.guest is not None
            try:
                # GO is journaled, RESUMED never came; both QEMUs are paused
                assert src.resumed_at == 0 and src.error
                assert await source.status() == "postmigrate"
                assert await held.guest.status() == "paused"
                assert [r.kind for r in dst_journal.records()] == ["READY"]
                wan.restore()
                async with (listen_across(wan, tls=server_context(pki)) as lst,
                            connect_across(wan, lst.port, tls=client_context(pki)) as again):
                    back = await lst.accept()
                    sending = asyncio.create_task(send_qemu_decision(
                        again, src_journal, "q1", source.mem_path))
                    decision = await first_message(back)
                    assert isinstance(decision, control.Go)
                    await settle(back, decision, {"q1": (QemuDest(None, workdir=tmp_path / "dst",
                                                           result=held), dst_journal)})
                    assert isinstance(await sending, control.Go)
                assert held.status == "running"
                assert [r.kind for r in dst_journal.records()] == ["READY", "RUNNING"]
                assert [r.kind for r in src_journal.records()] == ["START", "GO"]
                assert held.ram_chunks_repaired == len(
                    src_journal.records()[-1].fields["ram_repair"])
                before = await drain_console(source)
                after = await held.guest.wait_for_progress(30, min_counter=before.counter)
                assert after.counter >= before.counter
                assert await source.status() == "postmigrate"  # never ran again
            finally:
                await held.guest.quit()


TOKEN = "5" * 32


async def in_doubt_here(guest_image: GuestImage, tmp_path: Path) -> QemuDestResult:
    """A paused QEMU with its image, held in doubt at epoch 3 of migration q2."""
    from xmig.protocol.switchover import DestMachine

    image = tmp_path / "q2.raw"
    image.write_bytes(b"\0" * 4096)
    config = guest_config(guest_image, "mem", name="held", disk=image)
    guest = await QemuGuest.launch(replace(config, extra=("-S",)), tmp_path / "held")
    machine = DestMachine(3)
    machine.prepared()
    machine.final_applied()
    return QemuDestResult(migration="q2", epoch=3, status=Arrival.IN_DOUBT, guest=guest,
                          image=image, machine=machine, token=TOKEN,
                          owner="address:127.0.0.1")  # who a plaintext session's peer is


async def test_the_sources_abort_discards_a_guest_in_doubt(guest_image: GuestImage,
                                                           tmp_path: Path) -> None:
    held = await in_doubt_here(guest_image, tmp_path)
    guest = held.guest
    assert guest is not None
    src_journal, dst_journal = Journal(tmp_path / "src.j"), Journal(tmp_path / "dst.j")
    src_journal.append("START", "q2", 3, token=TOKEN)
    src_journal.append("ABORT", "q2", 3, reason="no READY in time")
    try:
        with make_stack("plain", tmp_path) as stack:
            async with session_pair(stack) as (src, dst):
                # the source waits for the destination's word that it discarded
                sending = asyncio.create_task(send_qemu_decision(
                    src, src_journal, "q2", guest.mem_path, timeout=30))
                decision = await first_message(dst)
                await settle(dst, decision, {
                    "q2": (QemuDest(None, workdir=tmp_path, result=held), dst_journal)})
                sent = await sending
                assert isinstance(sent, control.Abort) and decision == sent
        assert held.status == "discarded" and held.guest is None
        assert guest.returncode is not None  # its QEMU quit
        assert not (tmp_path / "q2.raw").exists()
        assert [r.kind for r in dst_journal.records()] == ["DISCARDED"]
    finally:
        await guest.quit()


async def test_a_decision_for_another_epoch_is_refused_and_changes_nothing(
        guest_image: GuestImage, tmp_path: Path) -> None:
    held = await in_doubt_here(guest_image, tmp_path)
    assert held.guest is not None
    src_journal, dst_journal = Journal(tmp_path / "src.j"), Journal(tmp_path / "dst.j")
    src_journal.append("START", "q2", 4, token=TOKEN)
    src_journal.append("GO", "q2", 4, ram_repair=[])
    try:
        with make_stack("plain", tmp_path) as stack:
            async with session_pair(stack) as (src, dst):
                sending = asyncio.create_task(send_qemu_decision(
                    src, src_journal, "q2", held.guest.mem_path, timeout=10))
                decision = await first_message(dst)
                with pytest.raises(GuestNotFound, match="not in doubt"):
                    await settle(dst, decision, {
                        "q2": (QemuDest(None, workdir=tmp_path, result=held), dst_journal)})
                with pytest.raises(GuestNotFound, match="destination refused"):
                    await sending
        assert held.status == "in-doubt" and await held.guest.status() == "prelaunch"
        assert (tmp_path / "q2.raw").exists() and dst_journal.records() == []
    finally:
        await held.guest.quit()
