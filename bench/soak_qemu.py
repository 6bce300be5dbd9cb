"""Soak, QEMU backend (``bench/soak.py --backend qemu``): one QEMU test guest migrated back
and forth between two agents across the emulated WAN, a seeded third of the migrations with
a fault; after each, what happened is found by inspection.

    sudo .venv/bin/python bench/soak.py --json --backend qemu --migrations 20 --seed 1
    sudo .venv/bin/python bench/soak.py --backend qemu --migrations 3 --seed 1 --keep

What differs from the reference guest's soak (bench/soak.py, whose plan, faults, link and
output keys this reuses):

- Processes. ``xmig agent --qemu-kernel K --qemu-initrd I`` in the ``src`` (A) and ``dst``
  (B) namespaces (K, I: the test guest, ``make guest-image``, ``--guest-build``). xmig has
  no command that starts a QEMU, so the first guest is started here as an operator would,
  with :meth:`QemuGuest.launch` in A's namespace (TCG, 128 MiB, a 32 MiB raw disk, its RAM
  file and disk in ``A0-N/``), then let go (its QMP detached). Migration *i* is ``xmig
  migrate --qemu-qmp QMP --to OTHER:7800 --workdir SIDE-mig`` run in the namespace of the
  side whose QEMU runs the guest: that client is the source's orchestrator (it attaches,
  mirrors the disk, tunnels QEMU's stream, journals, and quits the source QEMU once the
  destination runs it). An arrived guest is a QEMU the agent started (its ``hosting`` line
  gives pid and ``incoming-*/guest.qmp``), named ``guest`` (the migration's name from then on).
- Guest. ``xmig.workload=memdisk``: 32 MiB dirtied at 8 MiB/s, disk records of 4 KiB at
  0.5 MiB/s over the whole disk (a ring of 8192 records, 64 s), a progress line every
  200 ms on the serial console (``XMIG counter=C ... disk_seq=S``; ``S``: records the disk
  acknowledged). SDPS is off (``xmig migrate --qemu-qmp``'s default; ``--qemu-sdps on``).
- Where it runs: every QEMU process in the two namespaces is asked ``query-status`` over its
  QMP socket (one client at a time: a QEMU whose QMP is held, by an agent keeping it paused
  in doubt, does not answer and is not running); the agents' ``agent.ctl`` status lists what
  they hold in doubt. Exactly one QEMU must run, one this bench or an agent started.
- Lost acknowledged writes: the guest keeps no ledger; what it can tell is its newest
  progress line. After each migration the bench waits for a line with a larger counter on
  the console of the QEMU that runs (the guest runs on; a counter below the one seen before
  the migration means the guest restarted: an issue) and checks with
  :func:`xmig.guest.qemu.records.check_records` that the ``S`` records it reports
  acknowledged (the last 8192 of them: the ring) are on that QEMU's disk image. What fails
  is checked again after the next progress line and only what fails twice counts (a record
  read while it is written). Writes acknowledged more than 64 s before the check are not
  covered (overwritten by the ring); the check comes within seconds of a completed migration.
- Faults (``FAULTS`` of soak.py; ``src-host-killed`` is the reference guest's):
  ``link-cut``, ``link-stall`` and ``dst-killed`` as for the reference guest (a killed agent
  started again from its workdir, QEMU flags included). ``src-killed`` SIGKILLs the ``xmig
  migrate --qemu-qmp`` client, which *is* the migration's source side: nothing of xmig goes
  on with it (unlike the reference guest, whose host owns the migration). Expected outcome:
  the bench acts as the operator and settles it by the client's journal (the source's word):
  GO journaled → the destination runs the guest (``xmig resolve --force go`` there if it
  holds it in doubt; the paused source QEMU told to quit); otherwise → the source runs it
  (over its QMP, as xmig's own abort does: vCPUs stopped, the ``xmig-mirror`` job
  force-cancelled, the ``xmig-nbd`` node deleted, QEMU's migration cancelled, ``cont``; then
  ``xmig resolve --force abort`` at the destination if it holds a copy in doubt). Its
  ``status`` is ``client-killed``, ``settled`` ``operator-go``/``operator-abort``, and what
  the killed client left in its workdir (shadow image ``NAME.mirror.raw``, its sockets;
  a next ``xmig migrate`` there would replace them) is removed by the operator and listed
  in the run's ``notes``, not counted as leaked.
- Phases, fired on the client's events: ``negotiate`` (``connected``), ``brownout`` (its
  ``phase: brownout``: the disk mirror starts), ``precopy`` (its first ``progress``: QEMU's
  RAM stream flows), ``blackout``/``prepare`` (the first event in that phase: source paused /
  FINAL sent), ``ready`` (the destination agent's ``phase: ready``).
- Leaks: processes in the two namespaces but the agents and the QEMU that runs the guest
  (zombies too); sockets under the workdirs but the live QEMU's (its directory) and the
  agents' ``agent.ctl``; image files (``*.raw``, ``*.ram``, ``*.qcow2``, ``*.img``) under the
  workdirs outside the live QEMU's directory; ``/dev/shm/xmig-UID/`` files named for a
  process of this run; ``xmig-NAME-PID`` cgroups of a client of this run (SDPS). The first
  QEMU's own files (its disk, RAM file, QMP socket) are the operator's: removed by the bench
  once that QEMU has exited, not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError
from soak import (
    LEAK_GRACE_S,
    NS,
    OTHER,
    POLL_S,
    PORT,
    XMIG,
    Fault,
    Proc,
    Run,
    Soak,
    _processes_in,
    _walk,
    event_is,
)

from xmig.errors import XmigError
from xmig.guest.qemu.attach import option, process_argv
from xmig.guest.qemu.image import guest_cmdline
from xmig.guest.qemu.machine import QemuConfig, QemuGuest
from xmig.guest.qemu.progress import Progress, parse_progress
from xmig.guest.qemu.records import check_records
from xmig.private import private_dir
from xmig.protocol.journal import Journal
from xmig.service import hostctl

NAME = "vm1"
RAM_MB = 128
DISK_BYTES = 32 << 20
WORKLOAD = "memdisk"
PARAMS: dict[str, int | float | str] = {"mem_mb": 32, "mem_rate": 8, "disk_rate": 0.5,
                                        "report_ms": 200}
MAX_DOWNTIME = "500ms"  #: TCG on a shared 2-core host: QEMU's own estimate is coarse
BOOT_S = 120.0
QMP_S = 10.0
PROGRESS_S = 30.0  #: how long the live guest may take to print a newer progress line
#: the destination agent's words for a QEMU migration it hosts or has given up
QEMU_DST_WORD = ("hosting", "discarded", "session-failed", "in-doubt", "refused", "abandoned")
LIVE_MIGRATION = frozenset({"setup", "active", "pre-switchover", "device", "cancelling"})
FILES = re.compile(r".*\.(raw|ram|qcow2|img)$")
SHM_PID = re.compile(r"-(\d+)-(?:\d+|[0-9a-f]{8})\.\w+$")


def guest_desc() -> str:
    return (f"qemu {RAM_MB} MiB RAM, {DISK_BYTES >> 20} MiB disk, {WORKLOAD} "
            + " ".join(f"{k}={v}" for k, v in PARAMS.items()))


@dataclass(frozen=True)
class QemuLoc:
    """A QEMU process and its files, read from its command line."""

    side: str
    pid: int
    name: str  #: its ``-name``: the migration's name
    qmp: Path
    serial: Path
    disk: Path

    @property
    def dir(self) -> Path:
        return self.disk.parent


def qemu_at(side: str, pid: int) -> QemuLoc | None:
    argv = process_argv(pid)
    # the first monitor is the operator's (guest.qmp); an agent's QEMU has its own second
    qmp = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-qmp"), "")
    qmp = qmp.removeprefix("unix:").split(",")[0]
    serial = (option(argv, "-serial") or "").removeprefix("file:")
    drive = option(argv, "-drive") or ""
    disk = next((kv[5:] for kv in drive.split(",") if kv.startswith("file=")), "")
    name = (option(argv, "-name") or "").split(",")[0]
    if not (qmp and serial and disk):
        return None
    return QemuLoc(side, pid, name, Path(qmp), Path(serial), Path(disk))


def qemu_trigger(phase: str, client: Proc, dst: Proc, since_dst: int
                 ) -> Callable[[], dict[str, Any] | None]:
    """The event that says the QEMU migration is in ``phase`` (None: not yet)."""
    if phase == "negotiate":
        return lambda: client.find(event_is("connected"))
    if phase == "brownout":
        return lambda: client.find(event_is("phase", phase="brownout"))
    if phase == "precopy":
        return lambda: client.find(event_is("progress"))
    if phase == "ready":
        return lambda: dst.find(event_is("phase", phase="ready"), since_dst)
    return lambda: client.find(lambda e: e.get("phase") == phase)


# -- QMP ------------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def qmp(sock: Path) -> Any:
    client = QMPClient("xmig-soak")
    try:
        async with asyncio.timeout(QMP_S):
            await client.connect(str(sock))
        yield client
    finally:
        with contextlib.suppress(QMPError, OSError, EOFError):
            await client.disconnect()


async def qmp_status(sock: Path) -> str:
    """QEMU's run state, or ``unreachable`` (gone, or its QMP held by another client)."""
    try:
        async with qmp(sock) as client, asyncio.timeout(QMP_S):
            return str((await client.execute("query-status"))["status"])
    except (QMPError, OSError, EOFError):
        return "unreachable"


async def qmp_statuses(socks: list[Path]) -> list[str]:
    return list(await asyncio.gather(*(qmp_status(s) for s in socks)))


async def qmp_quit(sock: Path) -> None:
    with contextlib.suppress(QMPError, OSError, EOFError):
        async with qmp(sock) as client, asyncio.timeout(QMP_S):
            await client.execute("quit")


async def resume_source(sock: Path) -> list[str]:
    """What xmig's abort does to a source QEMU (QemuSource.abort_effects in
    xmig.guest.qemu.migrate), done by the operator after its ``xmig migrate`` died: the
    steps taken."""
    done: list[str] = []
    async with qmp(sock) as client, asyncio.timeout(120):
        run = client.execute
        jobs = await run("query-block-jobs")
        if jobs:
            with contextlib.suppress(QMPError):  # QEMU 7.2: no guest write in flight
                await run("stop")
            with client.listener(("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED")) as events:
                for job in jobs:
                    with contextlib.suppress(QMPError):
                        await run("block-job-cancel", {"device": job["device"], "force": True})
                    done.append(f"block-job-cancel {job['device']}")
                while await run("query-block-jobs"):
                    await events.get()
        nodes = {n.get("node-name") for n in await run("query-named-block-nodes")}
        if "xmig-nbd" in nodes:
            with contextlib.suppress(QMPError):
                await run("blockdev-del", {"node-name": "xmig-nbd"})
                done.append("blockdev-del xmig-nbd")
        with client.listener(("MIGRATION",)) as events:
            if (await run("query-migrate")).get("status") in LIVE_MIGRATION:
                await run("migrate_cancel")
                done.append("migrate_cancel")
                while (await run("query-migrate")).get("status") in LIVE_MIGRATION:
                    await events.get()
        if (await run("query-status"))["status"] != "running":
            await run("cont")
            done.append("cont")
    return done


# -- the soak -------------------------------------------------------------------------------

class QemuSoak(Soak):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.kernel = self.args.guest_build / "vmlinuz"
        self.initrd = self.args.guest_build / "initramfs.cpio.gz"
        self.mig_wd = {side: self.root / f"{side}-mig" for side in ("A", "B")}
        inodes = self.wan.link.netns_inodes()
        self.side_of = {inodes[NS[side]]: side for side in ("A", "B")}
        self.qguest: QemuLoc | None = None
        self.started: list[QemuGuest] = []  #: QEMUs this bench started (the operator's)
        self.cleaned: set[int] = set()
        self.every_agent: list[Proc] = []
        self.last: Progress | None = None  #: the guest's newest progress line seen

    def agent_args(self) -> list[str]:
        return ["--qemu-kernel", str(self.kernel), "--qemu-initrd", str(self.initrd)]

    def start_agent(self, side: str) -> Proc:
        agent = super().start_agent(side)
        self.every_agent.append(agent)
        return agent

    def roots(self) -> Iterator[tuple[str, Path]]:
        yield from super().roots()
        yield from self.mig_wd.items()

    def start_guest(self, side: str) -> None:
        self.fresh += 1
        wd = self.root / f"{side}0-{self.fresh}"
        self.starts.append(wd)
        private_dir(wd, exist_ok=True)
        disk = wd / f"{NAME}.raw"
        with disk.open("wb") as f:
            f.truncate(DISK_BYTES)
        config = QemuConfig(kernel=self.kernel, initrd=self.initrd, disk=disk, ram_mb=RAM_MB,
                            name=NAME, mem_path=wd / f"{NAME}.ram",
                            append=guest_cmdline(WORKLOAD, **PARAMS))
        guest = asyncio.run(self._boot(config, wd, side))
        assert guest.pid is not None
        self.started.append(guest)
        self.my_pids.add(guest.pid)
        self.qguest = qemu_at(side, guest.pid)
        self.last = None
        if self.qguest is None:
            raise SystemExit(f"soak: cannot read the QEMU's command line; see {wd}")

    async def _boot(self, config: QemuConfig, wd: Path, side: str) -> QemuGuest:
        try:
            guest = await QemuGuest.launch(config, wd, timeout=60.0,
                                           popen=functools.partial(self.wan.popen, NS[side]))
        except XmigError as err:
            raise SystemExit(f"soak: QEMU did not start: {err}") from err
        try:
            await guest.wait_for_progress(BOOT_S, min_counter=1)
        except XmigError as err:
            await guest.quit()
            raise SystemExit(f"soak: the QEMU guest did not boot: {err}") from err
        await guest.detach()  # an operator's QEMU: xmig migrate attaches to its QMP
        return guest

    def close(self) -> None:
        for guest in self.started:
            with contextlib.suppress(XmigError, OSError):
                asyncio.run(guest.quit())
        super().close()

    # -- one migration -----------------------------------------------------------------------

    def migrate(self, index: int, fault: Fault | None) -> Run:
        assert self.qguest is not None
        where = self.qguest
        src, dst = where.side, OTHER[where.side]
        run = Run(index, src, dst, fault)
        t0 = time.monotonic()
        self.last = newest_progress(where.serial) or self.last
        d0 = self.agents[dst].mark()
        client = self.spawn(f"migrate-{index}", [
            "migrate", "--qemu-qmp", str(where.qmp), "--to", f"{self.addr[dst]}:{PORT}",
            "--pki", str(self.pki), "--workdir", str(self.mig_wd[src]), "--json",
            "--link-rate", str(self.args.rate), "--max-downtime", MAX_DOWNTIME,
            "--sdps", self.args.qemu_sdps], src)
        self.my_pids.add(client.pid)
        limit = self.args.migration_timeout
        if fault is not None:
            seen = qemu_trigger(fault.phase, client, self.agents[dst], d0)
            fired = self.hub.wait(lambda: seen() or ({} if client.eof else None), limit)
            run.fired = ""
            if fired:
                run.fired = str(fired.get("phase") or fired.get("event"))
                self.fire(run, client, client, 0, dst, d0)
                d0 = 0 if fault.fault == "dst-killed" else d0
        self.wait_client(run, client, limit)
        if client.killed and run.fired:
            self.operator_settle(run, where, d0)
        self.dst_word(dst, d0)
        self.inspect_qemu(run)
        run.seconds = time.monotonic() - t0
        return run

    def wait_client(self, run: Run, client: Proc, limit: float) -> None:
        """The client's end: its report's status (``aborted`` for exit 3 without one)."""
        if client.killed:
            run.status = "client-killed"
            return
        if self.hub.wait(lambda: True if client.eof else None, limit) is None:
            run.issues.append(f"xmig migrate did not end in {limit:.0f} s")
            client.kill()
        run.rc = client.popen.returncode
        report = next((e for e in reversed(client.lines) if "event" not in e
                       and "status" in e), None)
        if report is not None:
            run.status = str(report["status"])
            dt = report.get("downtime_ms")
            run.downtime_ms = float(dt) if isinstance(dt, int | float) else None
        else:
            run.status = {3: "aborted", 4: "in-doubt"}.get(run.rc or 0, f"rc {run.rc}")
        if client.find(event_is("settled")):
            run.settled = str((client.find(event_is("settled")) or {}).get("decision"))

    def dst_word(self, dst: str, d0: int) -> None:
        """Wait (bounded) for the destination agent to host the guest or give it up."""
        agent = self.agents[dst]
        if agent.find(event_is("incoming"), d0):
            self.hub.wait(lambda: True if agent.eof or agent.find(
                lambda e: e.get("event") in QEMU_DST_WORD, d0) else None,
                self.args.settle_timeout)

    def operator_settle(self, run: Run, where: QemuLoc, d0: int) -> None:
        """The client (the source's orchestrator) was killed: settle by its journal."""
        records = [r for r in Journal(self.mig_wd[run.src] / "journal").records()
                   if r.migration == where.name]
        decision = "go" if records and records[-1].kind == "GO" else "abort"
        run.settled = f"operator-{decision}"
        if decision == "abort":
            try:
                steps = asyncio.run(resume_source(where.qmp))
                run.notes.append(f"source QEMU: {', '.join(steps) or 'ran on'}")
            except (QMPError, OSError, EOFError, XmigError) as err:
                run.issues.append(f"the operator could not resume the source QEMU: {err!r}")
        self.dst_word(run.dst, d0)
        held = [d for d in self.agent_doubts(run.dst) if d.get("migration") == where.name]
        if held:
            r = subprocess.run([*XMIG, "resolve", "--workdir", str(self.workdir[run.dst]),
                                "--migration", where.name, "--force", decision, "--yes",
                                "--json"], capture_output=True, text=True, timeout=120,
                               check=False)
            run.notes.append(f"xmig resolve --force {decision} at {run.dst}: rc {r.returncode}")
            if r.returncode:
                run.issues.append(f"xmig resolve failed: {r.stderr.strip()[-300:]}")
        if decision == "go":
            asyncio.run(qmp_quit(where.qmp))
            run.notes.append("source QEMU told to quit")
        wd = self.mig_wd[run.src]
        for path in sorted(wd.iterdir()) if wd.is_dir() else []:
            if path.name != "journal" and (stat.S_ISSOCK(path.lstat().st_mode)
                                           or FILES.match(path.name)):
                path.unlink(missing_ok=True)
                run.notes.append(f"removed the killed client's {path.name}")

    # -- inspection ---------------------------------------------------------------------------

    def agent_doubts(self, side: str) -> list[dict[str, Any]]:
        with contextlib.suppress(XmigError, OSError):
            st = hostctl.request(self.workdir[side] / "agent.ctl", "status", timeout=10)
            return [d for d in st.get("in_doubt") or [] if isinstance(d, dict)]
        return []

    def doubts_settled(self) -> list[tuple[str, dict[str, Any]]]:
        """What the agents hold in doubt once a decision they were told has had
        LEAK_GRACE_S to apply (an agent answers ABORT before its copy is gone)."""
        deadline = time.monotonic() + LEAK_GRACE_S
        while True:
            held = [(side, d) for side in ("A", "B") for d in self.agent_doubts(side)]
            if not held or time.monotonic() >= deadline:
                return held
            time.sleep(POLL_S)  # a poll of the agents' status, bounded by the deadline

    def qemus(self) -> list[QemuLoc]:
        out = []
        for pid, what in _processes_in(self.netns):
            if not what.startswith("qemu-system"):
                continue
            with contextlib.suppress(OSError):
                loc = qemu_at(self.side_of[os.stat(f"/proc/{pid}/ns/net").st_ino], pid)
                if loc is not None:
                    out.append(loc)
        return out

    def known_pids(self) -> set[int]:
        pids = {g.pid for g in self.started if g.pid is not None}
        for agent in self.every_agent:
            pids |= {int(e["pid"]) for e in agent.lines
                     if e.get("event") == "hosting" and isinstance(e.get("pid"), int)}
        return pids

    def inspect_qemu(self, run: Run) -> None:
        found = self.qemus()
        states = asyncio.run(qmp_statuses([q.qmp for q in found]))
        running = [q for q, st in zip(found, states, strict=True) if st == "running"]
        held = self.doubts_settled()
        if held:
            run.issues.append("left in doubt: " + ", ".join(
                f"{s}:{d.get('migration')}" for s, d in held))
        for side in ("A", "B"):
            agent = self.agents[side]
            if not agent.alive and not agent.killed:
                run.issues.append(f"agent {side} exited (rc {agent.popen.returncode})")
                self.start_agent(side)
        self.qguest = None
        if len(running) > 1:
            run.ended_on = "both"
            run.issues.append("both sides run the guest: " + ", ".join(
                f"{q.side}:{q.pid}" for q in running))
            self.stop_all(running)
        elif not running:
            run.ended_on = "none"
            if not held:
                run.issues.append("the guest runs nowhere and no host can resume it")
        else:
            self.qguest = running[0]
            run.ended_on = self.qguest.side
            if self.qguest.pid not in self.known_pids():
                run.issues.append(f"the guest runs in a QEMU no agent hosts "
                                  f"(pid {self.qguest.pid})")
        expected = {"done": run.dst, "aborted": run.src}.get(str(run.status))
        if run.settled:
            expected = run.dst if run.settled.endswith("go") else run.src
        if expected is not None and run.ended_on in ("A", "B") and run.ended_on != expected:
            run.issues.append(f"the source said {run.status}"
                              f"{'/' + run.settled if run.settled else ''}, "
                              f"the guest runs on {run.ended_on}")
        if self.qguest is not None:
            self.check_guest(run, self.qguest)
        if run.ended_on == "none" and held:
            self.stop_all(found)
        run.leaks = self.leaks_settled()
        if run.leaks:
            run.issues.append(f"leaked: {', '.join(run.leaks)}")
        if self.qguest is None:
            self.start_guest(run.src)

    def stop_all(self, qemus: list[QemuLoc]) -> None:
        """After a failure that left the guest twice or nowhere: quit every copy (a fresh
        guest follows); what their hosts then clean up is not counted as leaked."""
        for q in qemus:
            asyncio.run(qmp_quit(q.qmp))
        self.qguest = None
        self.known_leaks |= self.leak_set()

    def check_guest(self, run: Run, g: QemuLoc) -> None:
        """The guest runs on (a newer progress line, its counter not below the one seen
        before) and the disk records it reports acknowledged are on its disk."""
        now = newest_progress(g.serial)
        later = wait_progress(g.serial, now.counter if now else -1, PROGRESS_S)
        if later is None:
            run.issues.append(f"the guest on {g.side} printed no progress in {PROGRESS_S:g} s")
            return
        if self.last is not None and later.counter < self.last.counter:
            run.issues.append(f"the guest's counter went back from {self.last.counter} to "
                              f"{later.counter} (restarted?)")
        first = check_records(g.disk, later.disk_seq)
        if not first.ok:
            again = wait_progress(g.serial, later.counter, PROGRESS_S) or later
            second = check_records(g.disk, again.disk_seq)
            both = (set(first.bad) & set(second.bad)) - self.lost_seqs
            self.lost_seqs |= both
            extra = max(0, min(first.bad_count, second.bad_count) - len(first.bad))
            run.lost = len(both) + extra
            if run.lost:
                run.issues.append(f"{run.lost} acknowledged writes lost (records "
                                  f"{sorted(both)[:5]}... of {later.disk_seq} not on "
                                  f"{g.disk.relative_to(self.root)})")
        self.last = later

    def reap(self) -> None:
        """The QEMUs this bench started that have exited: reaped, and their files (the
        operator's: disk, RAM file, QMP socket) removed."""
        for guest in self.started:
            if guest.pid in self.cleaned or guest.returncode is None:
                continue
            guest.kill()  # exited: reaped; removes its RAM file and QMP socket
            if guest.config.disk is not None:
                Path(guest.config.disk).unlink(missing_ok=True)
            if guest.pid is not None:
                self.cleaned.add(guest.pid)

    def leak_set(self) -> set[str]:
        """What belongs to no live QEMU or agent of this run."""
        self.reap()
        g = self.qguest
        live = {a.pid for a in self.agents.values() if a.alive} | ({g.pid} if g else set())
        out = {f"process:{pid}:{what}" for pid, what in _processes_in(self.netns)
               if pid not in live}
        agent_ctls = {self.workdir[s] / "agent.ctl" for s in ("A", "B")}
        for _, root in self.roots():
            for path in _walk(root):
                try:
                    mode = path.lstat().st_mode
                except OSError:
                    continue
                if (g is not None and path.parent == g.dir) or path in agent_ctls:
                    continue
                if stat.S_ISSOCK(mode) or (stat.S_ISREG(mode) and FILES.match(path.name)):
                    kind = "socket" if stat.S_ISSOCK(mode) else "file"
                    out.add(f"{kind}:{path.relative_to(self.root)}")
        shm = Path(f"/dev/shm/xmig-{os.geteuid()}")
        for path in sorted(shm.iterdir()) if shm.is_dir() else []:
            m = SHM_PID.search(path.name)
            if m and int(m.group(1)) in self.my_pids:
                out.add(f"file:{path}")
        for base in (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")):
            for cg in base.glob("xmig-*") if base.is_dir() else []:
                tail = cg.name.rsplit("-", 1)[-1]
                if tail.isdigit() and int(tail) in self.my_pids:
                    out.add(f"cgroup:{cg}")
        return out


def newest_progress(serial: Path) -> Progress | None:
    """The newest progress line in a console log (its last 8 KiB)."""
    try:
        with serial.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        got = parse_progress(line, at=time.monotonic())
        if got is not None:
            return got
    return None


def wait_progress(serial: Path, above: int, timeout: float) -> Progress | None:
    """A progress line with a counter above ``above``, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = newest_progress(serial)
        if got is not None and got.counter > above:
            return got
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL_S)  # a poll of a file (no event says it grew), bounded by the deadline

