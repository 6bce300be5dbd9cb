"""Fault injection during whole migrations (issues 3 and 9): at several phases, cut the
link for longer than the resume deadline, stall it for less, corrupt a frame on the wire,
kill the destination agent, or kill the source agent; a destination stalled in the blackout
(its deadline), a destination filesystem that fills up mid-copy, a source ABORT over a thin
link; afterwards the commit protocol's invariants must hold (DESIGN.md):

- I1 exactly one side runs the guest or can resume it: before GO the source guest runs
  (unthrottled, not mirrored) and the destination discarded (journal DISCARDED, image
  deleted); after GO the destination runs and the source never resumes.
- I2 no acknowledged write is lost: every PUT the guest acknowledged to a UDP client reads
  back afterwards from whichever side runs, and after an abort the source disk holds every
  write in the guest's ledger.
- I3 the destination applies no older-epoch write (unit-tested in storage): here, the
  destination journals the migration's own epoch and deletes a discarded image.

The harness is ``xmig.harness.localrun`` with its inside exposed (the tasks, sessions and the link),
short session timeouts so a cut expires quickly, and the fault fired from a progress event.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import pytest

from xmig.errors import (
    ConnectionClosed,
    DeadlineExceeded,
    GuestError,
    GuestNotFound,
    InDoubt,
    MigrationAborted,
    MigrationError,
)
from xmig.events import Event
from xmig.guest.backend import DestBackend
from xmig.guest.sim import (
    DowntimeProbe,
    SimClient,
    SimConfig,
    SimGuest,
    make_disk_image,
    read_ledger,
    verify_ledger,
)
from xmig.guest.sim.dest import IMAGE_NAME, SimDest, SimDestResult
from xmig.guest.sim.source import MigrationOptions, SimSourceResult
from xmig.netem import LinkSpec, Wan
from xmig.netem.sessions import connect_across, listen_across
from xmig.orchestrator import recovery
from xmig.orchestrator.destination import first_message, settle
from xmig.orchestrator.run import migrate, receive_migration
from xmig.orchestrator.source import journaled_decision, send_decision
from xmig.protocol.control import Abort, Go, Resumed
from xmig.protocol.journal import Journal
from xmig.protocol.switchover import DestPhase
from xmig.storage.nbd import NbdServer
from xmig.storage.raw import RawFileBackend
from xmig.transport import Channel, Listener, SessionConfig, TransportSession
from xmig.transport.certs import init_pki
from xmig.transport.tls import client_context, server_context

pytestmark = pytest.mark.root

MiB = 1 << 20
RAM = 32 * MiB
DISK = 32 * MiB
DISK_FILLED = 16 * MiB  #: random (incompressible) data, so the bulk copy takes a while
LINK = LinkSpec.symmetric(rate_bps=200_000_000, rtt_s=0.02)
#: a cut link is given up after ~2 s (the real defaults are 5 s and 60 s)
SESSION = SessionConfig(idle_timeout=1.0, resume_deadline=2.0)
DEST_REPLY_TIMEOUT_S = 8.0  #: the destination's wait for FINAL (the whole pre-copy) and GO
SOURCE_REPLY_TIMEOUT_S = 5.0
PRECOPY_TIMEOUT_S = 10.0  #: the whole migration takes ~3 s here
RUN_TIMEOUT_S = 40.0


@dataclass
class Rig:
    """Everything a fault may act on."""

    wan: Wan
    guest: SimGuest
    src_session: TransportSession
    dst_session: TransportSession
    src_task: asyncio.Task[SimSourceResult] | None = None
    dst_task: asyncio.Task[SimDestResult] | None = None
    fired: asyncio.Event = field(default_factory=asyncio.Event)
    fired_at: dict[str, Any] = field(default_factory=dict)
    fired_mono: float = 0.0
    dst_ended_mono: float = 0.0


@dataclass
class Outcome:
    """What each side ended with, read before anything is cleaned up."""

    fired_at: dict[str, Any]
    src: SimSourceResult | BaseException
    dst: SimDestResult | BaseException
    src_running: bool
    src_paused: bool
    src_throttle: float
    src_mirroring: bool
    src_journal: list[str]
    dst_journal: list[str]
    dst_epochs: set[int]
    epoch: int
    token: str
    dst_image_exists: bool
    dst_running: bool
    puts_acknowledged: int
    puts_lost: int  #: -1: no side answered the client at all
    disk_lost_writes: int
    dst_in_doubt: bool  #: the destination ended in doubt (then settled, if ``settle``)
    dst_journal_before_settle: list[str]
    dst_image_before_settle: bool
    dst_ended_after_fault_s: float  #: from the fault to the destination's end
    connections_lost: int  #: by both sides' migration sessions


Trigger = Callable[[dict[str, Any]], bool]
Fault = Callable[[Rig], None]


def guest_config() -> SimConfig:
    return SimConfig(ram_bytes=RAM, workload="oltp", rate_Bps=10e6, disk_rate_Bps=2e6,
                     seed=11, disk_url="nbd+unix:///?socket=/set-below")


def fill_disk(path: Path) -> None:
    rng = random.Random(5)
    with open(path, "r+b") as f:
        f.write(rng.randbytes(DISK_FILLED))
        f.flush()
        os.fsync(f.fileno())


async def run_with_fault(tmp: Path, *, on: str, trigger: Trigger, fault: Fault,
                         settle: bool = False, blackout_timeout_s: float = 10.0,
                         link: LinkSpec = LINK) -> Outcome:
    """Migrate a fresh guest; the first event of side ``on`` ("src" or "dst") for which
    ``trigger`` holds fires ``fault``. Both sides then run to their end (within
    RUN_TIMEOUT_S); a destination left in doubt is settled with the source's journaled
    decision if ``settle``; the outcome is read, then everything is torn down."""
    src_dir, dst_dir = tmp / "src", tmp / "dst"
    src_dir.mkdir()
    dst_dir.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        wan = stack.enter_context(Wan(link))
        pki = init_pki(tmp / "pki", server_names=(wan.dst_addr, "127.0.0.1"))
        disk_path = make_disk_image(src_dir / "disk.raw", DISK)
        fill_disk(disk_path)
        disk = stack.enter_context(RawFileBackend(disk_path))
        nbd = NbdServer(disk)
        sock = src_dir / "disk.nbd"
        await nbd.start_unix(sock)
        config = replace(guest_config(), disk_url=f"nbd+unix:///?socket={sock}",
                         disk_bytes=DISK, udp_addr=("127.0.0.1", 0))
        guest = await asyncio.to_thread(SimGuest.start, config, workdir=src_dir, name="src")
        addr = guest.udp_address
        assert addr is not None
        probe = DowntimeProbe(addr, put_keys=True).start()
        dest: SimDestResult | BaseException | None = None
        try:
            async with listen_across(wan, tls=server_context(pki), config=SESSION) as lst:
                async with contextlib.AsyncExitStack() as sessions:
                    session = await sessions.enter_async_context(connect_across(
                        wan, lst.port, tls=client_context(pki), streams=2, config=SESSION))
                    dst_session = await lst.accept()
                    rig = Rig(wan, guest, session, dst_session)

                    def watch(side: str) -> Callable[[Event], None]:
                        def on_event(event: Event) -> None:
                            data = event.to_json()  # the triggers read the JSON line
                            if side == on and not rig.fired.is_set() and trigger(data):
                                rig.fired.set()
                                rig.fired_at.update(data)
                                rig.fired_mono = time.monotonic()
                                fault(rig)  # synchronously: nothing else runs meanwhile
                        return on_event

                    rig.dst_task = asyncio.create_task(receive_migration(
                        dst_session, workdir=dst_dir, journal=Journal(dst_dir / "journal"),
                        reply_timeout_s=DEST_REPLY_TIMEOUT_S, on_event=watch("dst")))
                    rig.dst_task.add_done_callback(
                        lambda _: setattr(rig, "dst_ended_mono", time.monotonic()))
                    options = MigrationOptions(reply_timeout_s=SOURCE_REPLY_TIMEOUT_S,
                                               timeout_s=PRECOPY_TIMEOUT_S,
                                               blackout_timeout_s=blackout_timeout_s)
                    rig.src_task = asyncio.create_task(migrate(
                        session, guest, disk, nbd, migration="m1",
                        journal=Journal(src_dir / "journal"), options=options,
                        on_progress=watch("src")))
                    async with asyncio.timeout(RUN_TIMEOUT_S):
                        src, dest = await asyncio.gather(rig.src_task, rig.dst_task,
                                                         return_exceptions=True)
                    assert rig.fired.is_set(), "the fault's trigger never came"
                    sessions.pop_all()  # a failed session is not closed in order
                assert dest is not None
                in_doubt = isinstance(dest, InDoubt)
                dst_journal_before = [r.kind for r in Journal(dst_dir / "journal").records()]
                dst_image_before = (dst_dir / IMAGE_NAME).exists()
                if isinstance(dest, InDoubt):
                    dest = cast(SimDestResult, dest.result)
                    if settle:  # the link is back: the source tells its journaled decision
                        await settle_over_a_new_session(wan, lst, pki, src_dir, dst_dir, dest)
            seen = probe.stop()
            dst_guest = dest.guest if isinstance(dest, SimDestResult) else None
            # the UDP service follows the guest: whichever side runs answers the client
            try:
                puts_lost = len(await asyncio.to_thread(seen.missing, SimClient(addr)))
            except GuestError:  # neither side answers: the guest runs nowhere
                puts_lost = -1
            src_journal = Journal(src_dir / "journal").records()
            dst_journal = Journal(dst_dir / "journal").records()
            src_running, src_paused = guest.running, guest.paused
            src_throttle, src_mirroring = guest.memory.throttle, nbd.hook is not None
            # a still guest, so the ledger and the disk are read at one instant
            await asyncio.to_thread(guest.pause)
            ledger = read_ledger(guest.ledger_path)
            disk_check = verify_ledger(ledger, disk.pread)
            return Outcome(
                fired_at=dict(rig.fired_at), src=src, dst=dest,
                src_running=src_running, src_paused=src_paused,
                src_throttle=src_throttle, src_mirroring=src_mirroring,
                src_journal=[r.kind for r in src_journal],
                dst_journal=[r.kind for r in dst_journal],
                dst_epochs={r.epoch for r in dst_journal},
                epoch=src_journal[0].epoch,
                token=str(src_journal[0].fields.get("token", "")),
                dst_image_exists=(dst_dir / IMAGE_NAME).exists(),
                dst_running=dst_guest is not None and dst_guest.running,
                puts_acknowledged=len(seen.acknowledged), puts_lost=puts_lost,
                disk_lost_writes=len(disk_check.lost), dst_in_doubt=in_doubt,
                dst_journal_before_settle=dst_journal_before,
                dst_image_before_settle=dst_image_before,
                dst_ended_after_fault_s=rig.dst_ended_mono - rig.fired_mono,
                connections_lost=sum(int(x.stats().get("connections_lost", 0))
                                     for x in (rig.src_session, rig.dst_session)))
        finally:
            if not probe.report.duration_s:
                probe.stop()
            await asyncio.to_thread(guest.quit)
            await nbd.close()
            if isinstance(dest, SimDestResult):
                if dest.guest is not None:
                    await asyncio.to_thread(dest.guest.quit)
                if dest.nbd is not None:
                    await dest.nbd.close()
                if dest.image is not None:
                    dest.image.close()
    raise AssertionError("unreachable")


async def settle_over_a_new_session(wan: Wan, lst: Listener, pki: Any, src_dir: Path,
                                    dst_dir: Path, dest: SimDestResult) -> None:
    """Restore the link; the source connects again and sends the decision its journal
    holds; the destination agent applies it to the migration it holds in doubt."""
    wan.restore()
    async with connect_across(wan, lst.port, tls=client_context(pki), streams=1,
                              config=SESSION) as session:
        dst_session = await lst.accept()
        in_doubt: dict[str, tuple[DestBackend, Journal]] = {
            "m1": (SimDest(workdir=dst_dir, result=dest), Journal(dst_dir / "journal"))}

        async def destination() -> None:
            first = await first_message(dst_session)
            assert isinstance(first, Go | Abort)
            await settle(dst_session, first, in_doubt)

        async with asyncio.timeout(RUN_TIMEOUT_S), asyncio.TaskGroup() as tg:
            tg.create_task(destination())
            tg.create_task(send_decision(session, Journal(src_dir / "journal"), "m1"))
        assert not in_doubt


# -- triggers ------------------------------------------------------------------------------

def negotiated(e: dict[str, Any]) -> bool:
    """(destination) PREPARED sent: the empty image and the paused guest exist."""
    return bool(e["event"] == "phase" and e["phase"] == "receiving")


def during_bulk_copy(e: dict[str, Any]) -> bool:
    disk = e.get("disk")
    return bool(e["event"] == "progress" and disk is not None and not disk["bulk_done"])


def during_precopy_rounds(e: dict[str, Any]) -> bool:
    """A pre-copy round after the first full pass, with more rounds to go."""
    return bool(e["event"] == "progress" and e["round"] >= 1 and e["decision"] == "continue")


def at_switchover_decision(e: dict[str, Any]) -> bool:
    """The planner has just decided to switch over and the bulk copy is done: the blackout
    starts next, with no wait in between."""
    disk = e.get("disk")
    return bool(e["event"] == "progress" and e["decision"] == "switchover"
                and disk is not None and disk["bulk_done"])


def in_mirror_drain(e: dict[str, Any]) -> bool:
    """The source guest is paused, its last pages queued; the mirror drains next."""
    return bool(e["event"] == "blackout" and e.get("step") == "final pages queued")


def in_blackout(e: dict[str, Any]) -> bool:
    """The source guest is paused, the mirror sealed (every queued write sent); no FINAL yet."""
    return bool(e["event"] == "blackout" and e.get("step") == "mirror sealed")


def in_prepare(e: dict[str, Any]) -> bool:
    """FINAL sent; the source waits for READY."""
    return bool(e["event"] == "phase" and e["phase"] == "prepare")


def before_go(e: dict[str, Any]) -> bool:
    """READY received: the source journals GO and sends it right after this event."""
    return bool(e["event"] == "blackout" and e.get("step") == "ready received")


def destination_running(e: dict[str, Any]) -> bool:
    """(destination) GO received, RUNNING journaled, the guest resumed, RESUMED sent."""
    return bool(e["event"] == "phase" and e["phase"] == "running")


# -- faults ----------------------------------------------------------------------------------

def cut_link(rig: Rig) -> None:
    """Pull the cable for good: longer than the resume deadline."""
    rig.wan.cut()


#: shorter than the session's idle timeout + resume deadline (3 s here): the session resumes
STALL_S = 1.5


def stall_link(rig: Rig) -> None:
    """The link goes dark for STALL_S, then comes back (a flapping router)."""
    rig.wan.cut()
    asyncio.get_running_loop().call_later(STALL_S, rig.wan.restore)


def corrupt_frame(rig: Rig) -> None:
    """A frame corrupted on the wire past the checksums (a broken middlebox): a TLS record
    of seeded garbage written into one of the source's connections, under its TLS layer.
    The destination's TLS refuses it (bad record MAC) and drops that connection; the
    session goes on over its other one and resumes what was in flight."""
    conn = next(iter(rig.src_session._conns.values()))
    assert conn.transport is not None
    sock = conn.transport.get_extra_info("socket")
    garbage = random.Random(9).randbytes(64)
    os.write(sock.fileno(), b"\x17\x03\x03\x00\x40" + garbage)


def kill_destination(rig: Rig) -> None:
    """The destination agent dies: its task stops and its connections drop (it cleans
    nothing up, as a killed process would not)."""
    assert rig.dst_task is not None
    rig.dst_task.cancel()
    rig.dst_session.session.fail(ConnectionClosed("destination agent killed"))
    rig.dst_session._after_io()  # the driver aborts the connections now


def kill_source(rig: Rig) -> None:
    """The source agent's migration is cancelled (the guest is a process of its own and
    the session stays open: the destination hears nothing more)."""
    assert rig.src_task is not None
    rig.src_task.cancel()


def stall_destination(rig: Rig) -> None:
    """The destination stalls (its disk hangs, say): its next word (READY) waits until
    the source has ended its migration, then goes out."""
    send = rig.dst_session.send

    async def stalled(channel: Channel, data: bytes) -> None:
        if channel is Channel.CONTROL:
            assert rig.src_task is not None
            await asyncio.wait({rig.src_task})
        await send(channel, data)

    rig.dst_session.send = stalled  # type: ignore[method-assign]


# -- invariants ----------------------------------------------------------------------------

def assert_destination_discarded(out: Outcome) -> None:
    """Before GO, a live destination throws away what it received (I1, I3)."""
    assert out.dst_journal[-1:] == ["DISCARDED"], out.dst_journal
    assert "RUNNING" not in out.dst_journal
    assert out.dst_epochs <= {out.epoch}  # only this migration's epoch (fencing: I3)
    assert not out.dst_image_exists, "a discarded image is deleted"
    assert not out.dst_running


def assert_source_runs_the_guest(out: Outcome) -> None:
    """Before GO, the source runs the guest again, unharmed (I1, I2)."""
    assert "GO" not in out.src_journal
    assert out.src_running and not out.src_paused, "the source guest must run again"
    assert out.src_throttle == 0.0, "the throttle must be released"
    assert not out.src_mirroring, "guest writes must not be mirrored any more"
    assert out.puts_acknowledged > 0
    assert out.puts_lost == 0
    assert out.disk_lost_writes == 0  # the source disk holds every acknowledged write


def assert_destination_has_the_guest(out: Outcome) -> None:
    """After GO: the destination runs the guest; the source never resumes (I1, I2)."""
    assert out.src_journal[-1] == "GO", out.src_journal
    assert not out.src_running, "the source must never resume after GO"
    assert out.dst_journal[-1] == "RUNNING", out.dst_journal
    assert out.dst_epochs == {out.epoch}
    assert out.dst_running
    assert out.puts_acknowledged > 0
    assert out.puts_lost == 0


BROWNOUT = [
    pytest.param("src", during_bulk_copy, id="bulk"),
    pytest.param("src", during_precopy_rounds, id="precopy"),
]
BLACKOUT = pytest.param("src", in_blackout, id="blackout")
PHASES_BEFORE_GO = [
    pytest.param("dst", negotiated, id="negotiate"),
    *BROWNOUT,
    pytest.param("src", in_mirror_drain, id="mirror-drain"),
    BLACKOUT,
    pytest.param("src", in_prepare, id="prepare"),
]

@pytest.mark.parametrize(("on", "trigger"), PHASES_BEFORE_GO)
async def test_link_cut_before_go_aborts_to_the_source(
    on: str, trigger: Trigger, tmp_path: Path
) -> None:
    out = await run_with_fault(tmp_path, on=on, trigger=trigger, fault=cut_link)
    assert isinstance(out.src, MigrationAborted), out.src
    assert out.src_journal[-1] == "ABORT", out.src_journal
    assert_source_runs_the_guest(out)
    assert_destination_discarded(out)
    # ... and the cut is noticed when the session expires (resume_deadline), not later
    assert type(out.src.__cause__).__name__ == "SessionExpired", repr(out.src.__cause__)


@pytest.mark.parametrize(("on", "trigger"), [PHASES_BEFORE_GO[0], *BROWNOUT, BLACKOUT,
                                             PHASES_BEFORE_GO[-1]])
async def test_destination_killed_before_go_aborts_to_the_source(
    on: str, trigger: Trigger, tmp_path: Path
) -> None:
    out = await run_with_fault(tmp_path, on=on, trigger=trigger, fault=kill_destination)
    assert isinstance(out.src, MigrationAborted), out.src
    # cancelled, or failed on its dropped session first (when killed from its own event)
    assert isinstance(out.dst, asyncio.CancelledError | ConnectionClosed), out.dst
    assert out.src_journal[-1] == "ABORT", out.src_journal
    assert "RUNNING" not in out.dst_journal
    assert_source_runs_the_guest(out)


@pytest.mark.parametrize(("on", "trigger"), [*BROWNOUT, BLACKOUT])
async def test_source_killed_before_go_leaves_the_source_running(
    on: str, trigger: Trigger, tmp_path: Path
) -> None:
    out = await run_with_fault(tmp_path, on=on, trigger=trigger, fault=kill_source)
    assert isinstance(out.src, asyncio.CancelledError), out.src
    # the destination hears nothing more and discards within its reply timeout
    assert_destination_discarded(out)
    assert_source_runs_the_guest(out)


@pytest.mark.parametrize(("on", "trigger"), [
    *PHASES_BEFORE_GO, pytest.param("src", before_go, id="before-go"),
    pytest.param("dst", destination_running, id="after-go")])
async def test_a_stalled_link_at_each_phase_leaves_exactly_one_side_running(
        on: str, trigger: Trigger, tmp_path: Path) -> None:
    out = await run_with_fault(tmp_path, on=on, trigger=trigger, fault=stall_link,
                               settle=True)
    # the session rides the stall out: the migration completes, or (a deadline passed in
    # the blackout) aborts; a side left in doubt is settled by the source's journal
    if out.dst_running:
        assert_destination_has_the_guest(out)
    else:
        assert isinstance(out.src, MigrationAborted), out.src
        assert_source_runs_the_guest(out)
        assert_destination_discarded(out)


@pytest.mark.parametrize(("on", "trigger"), [
    *PHASES_BEFORE_GO, pytest.param("src", before_go, id="before-go"),
    pytest.param("dst", destination_running, id="after-go")])
async def test_a_corrupted_frame_at_each_phase_leaves_exactly_one_side_running(
        on: str, trigger: Trigger, tmp_path: Path) -> None:
    out = await run_with_fault(tmp_path, on=on, trigger=trigger, fault=corrupt_frame,
                               settle=True)
    # nothing corrupted is taken: the connection is dropped and the session resumes, so
    # the migration completes, or (a deadline passed meanwhile) aborts; in doubt, settled
    assert out.connections_lost >= 1, "the corrupted record must cost its connection"
    if out.dst_running:
        assert_destination_has_the_guest(out)
    else:
        assert isinstance(out.src, MigrationAborted), out.src
        assert_source_runs_the_guest(out)
        assert_destination_discarded(out)


@contextlib.contextmanager
def small_filesystem(path: Path, size: int) -> Iterator[None]:
    """A tmpfs of ``size`` bytes mounted on ``path`` (a destination disk that fills)."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                    str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill_up(path: Path, leave: int) -> Fault:
    """Another tenant fills ``path``'s filesystem up to ``leave`` bytes free."""
    def fault(rig: Rig) -> None:
        st = os.statvfs(path)
        with open(path / "filler", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - leave)
    return fault


async def test_a_destination_disk_filling_up_mid_copy_aborts_and_the_source_runs_on(
        tmp_path: Path) -> None:
    # the image fits when the guest arrives; then the filesystem fills, 1 MiB left
    (tmp_path / "dst").mkdir()
    with small_filesystem(tmp_path / "dst", DISK + 8 * MiB):
        out = await run_with_fault(tmp_path, on="dst", trigger=negotiated,
                                   fault=fill_up(tmp_path / "dst", MiB))
        assert isinstance(out.src, MigrationAborted), out.src
        assert type(out.src.__cause__).__name__ == "DiskFull", repr(out.src.__cause__)
        assert_source_runs_the_guest(out)
        assert_destination_discarded(out)


#: a thin, long link: the bulk copy keeps megabytes queued in the connections
THIN = LinkSpec.symmetric(rate_bps=20_000_000, rtt_s=0.1)


async def test_a_source_abort_reaches_the_destination_ahead_of_queued_data(
        tmp_path: Path) -> None:
    out = await run_with_fault(tmp_path, on="src", trigger=during_bulk_copy,
                               fault=kill_source, link=THIN)
    assert isinstance(out.src, asyncio.CancelledError), out.src
    assert isinstance(out.dst, MigrationError) and "source aborted" in str(out.dst), out.dst
    assert_destination_discarded(out)
    assert_source_runs_the_guest(out)
    # told, not timed out (DEST_REPLY_TIMEOUT_S): within about 2 RTT + 1 s (a margin of 2 s
    # for a busy box, where both sides share this process)
    assert out.dst_ended_after_fault_s < 2 * THIN.rtt_s + 1.0 + 2.0, out.dst_ended_after_fault_s


async def test_source_killed_at_the_switchover_decision_does_not_go(tmp_path: Path) -> None:
    out = await run_with_fault(tmp_path, on="src", trigger=at_switchover_decision,
                               fault=kill_source)
    assert isinstance(out.src, asyncio.CancelledError), out.src
    assert "GO" not in out.src_journal, out.src_journal
    assert_destination_discarded(out)


async def test_a_destination_stalled_in_the_blackout_is_aborted_at_its_deadline(
        tmp_path: Path) -> None:
    out = await run_with_fault(tmp_path, on="src", trigger=in_prepare, fault=stall_destination,
                               blackout_timeout_s=1.5)
    # the source's reply timeout (5 s) is longer: the blackout's own bound ended it
    assert isinstance(out.src, MigrationAborted), out.src
    assert isinstance(out.src.__cause__, DeadlineExceeded), repr(out.src.__cause__)
    assert "blackout passed its deadline of 1.5 s" in str(out.src.__cause__)
    assert out.src_journal[-1] == "ABORT", out.src_journal
    assert_source_runs_the_guest(out)
    # the stalled destination, once it moves, finds the ABORT and discards
    assert_destination_discarded(out)


async def test_link_cut_after_go_reached_the_destination(tmp_path: Path) -> None:
    out = await run_with_fault(tmp_path, on="dst", trigger=destination_running,
                               fault=cut_link)
    # RESUMED never came: the source keeps its paused copy, in doubt, until it hears
    assert isinstance(out.src, SimSourceResult) and out.src.status == "in-doubt", out.src
    assert not out.src_running and out.src_journal[-1] == "GO", out.src_journal
    assert isinstance(out.dst, SimDestResult) and out.dst.status == "running", out.dst
    assert_destination_has_the_guest(out)
    # settling again, it is told (from the destination's journal) that the guest runs there
    [held] = recovery.read_dir(tmp_path / "dst")
    assert held.phase is DestPhase.RUNNING and held.token == out.token
    go = Go("m1", out.epoch, out.token)
    assert recovery.answer([held], go, held.owner) == Resumed("m1", out.epoch, 0.0)
    with pytest.raises(GuestNotFound):  # another identity is told nothing
        recovery.answer([held], go, "someone-else")
    # I5: memory and device state at resume equal the source's at pause (by digest)
    src = out.src
    assert src.memory_digest and src.ready_digests["memory"] == src.memory_digest
    assert src.ready_digests["device"] == src.device_digest
    assert src.ready_digests["disk"] == src.disk_digest


async def test_link_cut_as_go_is_sent_keeps_one_side_able_to_run(tmp_path: Path) -> None:
    out = await run_with_fault(tmp_path, on="src", trigger=before_go, fault=cut_link,
                               settle=True)
    # the source journaled GO: it never resumes. The destination was READY and never got
    # GO: it stays paused and able to resume (journal READY, image kept), in doubt ...
    assert out.src_journal[-1] == "GO", out.src_journal
    assert not out.src_running
    assert out.dst_in_doubt
    assert out.dst_journal_before_settle[-1] == "READY", out.dst_journal_before_settle
    assert out.dst_image_before_settle
    # ... until the source's decision (GO, from its journal) reaches it: then it runs
    assert_destination_has_the_guest(out)


async def test_source_journal_gives_the_in_doubt_decision(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    assert journaled_decision(journal, "m1").type == "abort"
    journal.append("START", "m1", 3)
    assert journaled_decision(journal, "m1") == Abort("m1", 3, "no GO was journaled")
    journal.append("GO", "m1", 3)
    journal.append("START", "m2", 4)
    journal.append("ABORT", "m2", 4, reason="NotConverging: too slow")
    assert journaled_decision(journal, "m1") == Go("m1", 3)
    assert journaled_decision(journal, "m2") == Abort("m2", 4, "NotConverging: too slow")
