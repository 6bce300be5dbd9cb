"""Soak: one reference guest migrated back and forth between two agents across the emulated
WAN, many times, a seeded third of the migrations with a fault; after each, what happened
is found by inspection (where the guest runs, lost acknowledged writes, leaks).

    sudo .venv/bin/python bench/soak.py --json --backend sim --migrations 200 --seed 1
    sudo .venv/bin/python bench/soak.py --migrations 10 --seed 1        # a table, not JSON
    sudo .venv/bin/python bench/soak.py --json --backend qemu --migrations 20 --seed 1

``--backend qemu`` (bench/soak_qemu.py, whose docstring says what differs): a QEMU test
guest (``make guest-image``; ``--guest-build``) started on A by this bench, agents with
``--qemu-kernel``/``--qemu-initrd``, migrations with ``xmig migrate --qemu-qmp`` run in the
namespace of the side whose QEMU runs it; ``src-killed`` kills that client, which is the
migration's source side, and the bench settles it as the operator, by its journal.

Real processes, as an operator runs them: ``xmig agent`` in the emulator's ``src``
namespace (side A) and in its ``dst`` namespace (side B), neither ``--once``; the guest
starts with ``xmig guest start`` on A; migration *i* is ``xmig migrate --guest CTL --to
OTHER:7800 --json`` from whichever side runs the guest (an arrived guest's host announces
its control socket ``DIR/NAME.ctl``), so the guest goes A→B, B→A, ... until a migration
aborts (it then goes on from where it runs). The link is 200 Mbit/s × 20 ms; the guest
32 MiB RAM, 32 MiB disk, oltp at 10 MB/s of pages and 2 MB/s of disk writes (a migration
takes a few seconds).

Faults (``random.Random(seed)``: round(N/3) migrations chosen, each given one fault and
one phase, uniformly; ``--faults`` narrows or widens the set):

- ``link-cut``: the link cut until both sides have given the session up (the source's
  migration ended, the destination agent said so), which is longer than the session's
  resume deadline (60 s, counted from its idle timeout, 5 s), at most ``--cut`` (default
  90 s); then restored;
- ``link-stall``: the link cut for a seeded 1 s to ``--stall-max`` (default 20 s), shorter
  than the deadline, then restored;
- ``dst-killed``: the destination agent killed with SIGKILL, then started again from the
  same workdir and address;
- ``src-killed``: the source-side ``xmig migrate`` killed with SIGKILL (the migration
  belongs to the guest's host and must go on without its client);
- ``src-host-killed`` (only when asked for in ``--faults``): the guest's host process
  killed with SIGKILL (an agent is started again from its workdir). The reference guest is
  a child of its host and dies with it, so before GO the guest is lost by construction.

Phases, fired when the migration's events show them: ``negotiate`` (the client's
``connected``), ``brownout`` (its first ``phase: brownout``: bulk copy and round 0),
``precopy`` (its first ``progress`` of round ≥ 1), ``blackout`` (``phase: blackout``: the
source guest paused), ``prepare`` (``phase: prepare``: FINAL sent, READY awaited),
``ready`` (the destination agent's ``phase: ready``: READY journaled and sent).

After each migration (and once a migration left in doubt has settled): the guest's hosts
are asked for their status through every control socket in the workdirs; the guest's
ledgers (every host it ran on, in order) are checked against the disk of the side that runs
it (xmig.guest.sim verify_ledger); processes in the two namespaces, sockets and image files
in the workdirs and files in /dev/shm/xmig-UID/ that do not belong to the live guest are
leaks. Output keys: bench/README.md. Exit status 1 when a migration failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from longhaul import versions

from xmig.errors import XmigError
from xmig.guest.sim import read_ledger, verify_ledger
from xmig.guest.sim.ledger import RECORD, LedgerEntry
from xmig.netem import LinkSpec, Wan, tun_available
from xmig.service import hostctl
from xmig.units import argtype, parse_bit_rate, parse_duration

T = TypeVar("T")
XMIG = [sys.executable, "-m", "xmig.cli"]
PORT = 7800
NAME = "vm1"
NS: dict[str, Literal["src", "dst"]] = {"A": "src", "B": "dst"}
OTHER = {"A": "B", "B": "A"}
GUEST = ["--ram", "32MiB", "--disk", "32MiB", "--workload", "oltp", "--rate", "10MB/s",
         "--disk-rate", "2MB/s"]
FAULTS = ("link-cut", "link-stall", "dst-killed", "src-killed")
ALL_FAULTS = (*FAULTS, "src-host-killed")
PHASES = ("negotiate", "brownout", "precopy", "blackout", "prepare", "ready")
IMAGES = re.compile(r"(disk\.raw|guest\.ram|.*\.(raw|qcow2|img))$")
SHM_NAME = re.compile(r"-(\d+)-[0-9a-f]{8}\.\w+$")
READY_TIMEOUT_S = 60.0
LEAK_GRACE_S = 15.0  #: what a side still cleans up after a migration ended may take this long
#: the destination agent's words for a session it has given up (or a guest it now hosts)
DST_GAVE_UP = ("discarded", "session-failed", "in-doubt", "refused", "ready")
POLL_S = 0.25  #: the interval of the (deadline-bounded) polls of files and the process table


# -- processes and their JSON lines ------------------------------------------------------------

class Hub:
    """One condition for every process's output: a wait re-checks its predicate whenever a
    line arrives (or a process's output ends), until the predicate gives a value or time is up."""

    def __init__(self) -> None:
        self.cond = threading.Condition()

    def wait(self, pred: Callable[[], T | None], timeout: float) -> T | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                got = pred()
                if got is not None:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)


class Proc:
    """An ``xmig`` process whose stdout is JSON lines (kept, and copied to ``LABEL.out``)."""

    def __init__(self, hub: Hub, popen: subprocess.Popen[bytes], label: str, logdir: Path
                 ) -> None:
        self.hub, self.popen, self.label = hub, popen, label
        self.lines: list[dict[str, Any]] = []
        self.eof = False
        self.killed = False  #: by this bench
        self._log = logdir / f"{label}.out"
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        with self._log.open("ab") as log:
            for raw in self.popen.stdout:
                log.write(raw)
                log.flush()
                try:
                    item = json.loads(raw)
                except json.JSONDecodeError:
                    item = {"event": "non-json", "line": raw.decode(errors="replace")}
                if not isinstance(item, dict):
                    item = {"event": "non-json", "line": raw.decode(errors="replace")}
                with self.hub.cond:
                    self.lines.append(item)
                    self.hub.cond.notify_all()
        self.popen.wait()
        with self.hub.cond:
            self.eof = True
            self.hub.cond.notify_all()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def mark(self) -> int:
        return len(self.lines)

    def find(self, pred: Callable[[dict[str, Any]], bool], since: int = 0
             ) -> dict[str, Any] | None:
        for item in self.lines[since:]:
            if pred(item):
                return item
        return None

    def kill(self) -> None:
        """SIGKILL, then reap."""
        if self.alive:
            self.killed = True
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, SIGKILL after ``timeout``."""
        if self.alive:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def dst_gave_up(e: dict[str, Any]) -> bool:
    """The destination agent hosts the guest that arrived, or has given its session up."""
    kind = e.get("event")
    return kind in DST_GAVE_UP and (kind != "ready" or e.get("role") == "destination")


def event_is(kind: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("event") == kind and all(e.get(k) == v for k, v in fields.items())


# -- the plan ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fault:
    index: int
    fault: str
    phase: str
    seconds: float | None = None  #: how long the link is cut (link-cut, link-stall)


def plan(n: int, seed: int, faults: tuple[str, ...], share: float, cut_s: float,
         stall_max_s: float) -> dict[int, Fault]:
    """Which migrations get which fault at which phase (seeded, in index order)."""
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(n), min(n, round(n * share))))
    out: dict[int, Fault] = {}
    for i in chosen:
        kind, phase = rng.choice(faults), rng.choice(PHASES)
        seconds = cut_s if kind == "link-cut" else (
            round(rng.uniform(1.0, stall_max_s), 2) if kind == "link-stall" else None)
        out[i] = Fault(i, kind, phase, seconds)
    return out


def trigger(phase: str, client: Proc, dst: Proc, since_dst: int
            ) -> Callable[[], dict[str, Any] | None]:
    """The event that says the migration is in ``phase`` (None: not yet)."""
    def on_client(pred: Callable[[dict[str, Any]], bool]) -> Callable[[], dict[str, Any] | None]:
        return lambda: client.find(pred)

    if phase == "negotiate":
        return on_client(event_is("connected"))
    if phase == "precopy":
        return on_client(lambda e: e.get("event") == "progress" and e.get("round", 0) >= 1)
    if phase == "ready":
        return lambda: dst.find(event_is("phase", phase="ready"), since_dst)
    return on_client(event_is("phase", phase=phase))


# -- where the guest is ------------------------------------------------------------------------

@dataclass
class Location:
    side: str
    host: Proc
    ctl: Path
    dir: Path  #: the host's guest directory (disk image, ledger)
    guest_pid: int


@dataclass
class Run:
    """One migration's record."""

    index: int
    src: str
    dst: str
    fault: Fault | None
    fired: str | None = None  #: the event that fired the fault ("" when never seen)
    rc: int | None = None
    status: str | None = None  #: what the source host said: done, aborted, in-doubt, ...
    settled: str | None = None
    ended_on: str | None = None  #: the side that runs the guest afterwards
    downtime_ms: float | None = None
    cut_s: float | None = None  #: how long the link was cut
    lost: int = 0
    leaks: list[str] = field(default_factory=list)
    issues: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  #: what the bench did as the operator
    seconds: float = 0.0

    @property
    def outcome(self) -> str:
        if self.issues:
            return "failure"
        return "completed" if self.ended_on == self.dst else "aborted_clean"

    def brief(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "from": self.src, "to": self.dst,
                               "outcome": self.outcome, "rc": self.rc, "status": self.status,
                               "ended_on": self.ended_on, "downtime_ms": self.downtime_ms,
                               "seconds": round(self.seconds, 2)}
        if self.fault is not None:
            out.update(fault=self.fault.fault, phase=self.fault.phase,
                       fired=bool(self.fired))
        if self.cut_s is not None:
            out["cut_s"] = self.cut_s
        if self.settled:
            out["settled"] = self.settled
        if self.issues:
            out["issues"] = self.issues
        if self.notes:
            out["notes"] = self.notes
        return out


class Soak:
    def __init__(self, args: argparse.Namespace, wan: Wan, root: Path) -> None:
        self.args, self.wan, self.root = args, wan, root
        self.hub = Hub()
        self.logs = root / "logs"
        self.logs.mkdir()
        self.pki = root / "pki"
        self.addr = {"A": wan.src_addr, "B": wan.dst_addr}
        self.workdir = {side: root / side for side in ("A", "B")}
        self.starts: list[Path] = []  #: workdirs of `xmig guest start` hosts
        self.agents: dict[str, Proc] = {}
        self.agent_runs = {"A": 0, "B": 0}
        self.my_pids: set[int] = set()
        self.netns = {v for k, v in wan.link.netns_inodes().items() if k in ("src", "dst")}
        self.chain: list[Path] = []  #: the guest's ledgers, hosts in order
        self.known_leaks: set[str] = set()
        self.lost_seqs: set[int] = set()
        self.guest: Location | None = None
        self.ignored: set[Path] = set()  #: a crashed guest's directory and control socket
        self.fresh = 0  #: guests started (more than one when one was lost)
        self.leaked = {"processes": 0, "sockets": 0, "files": 0, "cgroups": 0}

    # -- starting things -----------------------------------------------------------------------

    def spawn(self, label: str, argv: list[str], side: str | None) -> Proc:
        with (self.logs / f"{label}.stderr").open("ab") as err:
            kw: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": err,
                                  "stdin": subprocess.DEVNULL}
            popen = (self.wan.popen(NS[side], XMIG + argv, **kw) if side is not None
                     else subprocess.Popen(XMIG + argv, **kw))
        return Proc(self.hub, popen, label, self.logs)

    def setup(self) -> None:
        r = subprocess.run([*XMIG, "certs", "init", str(self.pki), "--server-name",
                            self.addr["A"], "--server-name", self.addr["B"]],
                           capture_output=True, text=True, timeout=60, check=False)
        if r.returncode:
            raise SystemExit(f"soak: certs init failed: {r.stderr.strip()}")
        for side in ("A", "B"):
            self.start_agent(side)
        self.start_guest("A")

    def start_agent(self, side: str) -> Proc:
        self.agent_runs[side] += 1
        agent = self.spawn(f"agent-{side}-{self.agent_runs[side]}", [
            "agent", "--listen", f"{self.addr[side]}:{PORT}", "--pki", str(self.pki),
            "--workdir", str(self.workdir[side]), "--json", *self.agent_args()], side)
        self.my_pids.add(agent.pid)
        self.agents[side] = agent
        if not self.hub.wait(lambda: agent.find(event_is("ready", role="agent")) or (
                {} if agent.eof else None), READY_TIMEOUT_S):
            raise SystemExit(f"soak: agent {side} did not start; see {self.logs}")
        return agent

    def agent_args(self) -> list[str]:
        """More ``xmig agent`` flags (the QEMU backend's: how to start a QEMU)."""
        return []

    def start_guest(self, side: str) -> None:
        self.fresh += 1
        wd = self.root / f"{side}0-{self.fresh}"
        self.starts.append(wd)
        host = self.spawn(f"guest-{self.fresh}", [
            "guest", "start", "--name", NAME, "--workdir", str(wd), *GUEST,
            "--seed", str(self.args.seed + self.fresh), "--json"], side)
        self.my_pids.add(host.pid)
        ready = self.hub.wait(lambda: host.find(event_is("ready", role="source")) or (
            {} if host.eof else None), READY_TIMEOUT_S)
        if not ready:
            raise SystemExit(f"soak: the guest did not start; see {self.logs}")
        gdir = Path(ready["workdir"])
        self.guest = Location(side, host, Path(ready["ctl"]), gdir, int(ready["guest_pid"]))
        self.chain = [gdir / f"{NAME}.ledger"]

    def close(self) -> None:
        if self.guest is not None:
            with contextlib.suppress(XmigError, OSError):
                hostctl.request(self.guest.ctl, "stop", timeout=30)
            self.guest.host.stop()
        for agent in self.agents.values():
            agent.stop()
        # what the run leaked (counted already) must not outlive it: processes left in its
        # namespaces, its guests' files in /dev/shm (its directory goes unless --keep)
        for pid, _ in _processes_in(self.netns):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for item in self.leak_set():
            kind, what = item.split(":", 1)
            if kind == "file" and what.startswith("/dev/shm/"):
                with contextlib.suppress(OSError):
                    os.unlink(what)

    # -- one migration -------------------------------------------------------------------------

    def migrate(self, index: int, fault: Fault | None) -> Run:
        assert self.guest is not None
        where = self.guest
        src, dst = where.side, OTHER[where.side]
        run = Run(index, src, dst, fault)
        t0 = time.monotonic()
        dagent, host = self.agents[dst], where.host
        host_is_agent = host is self.agents[src]
        d0, h0 = dagent.mark(), host.mark()
        client = self.spawn(f"migrate-{index}", [
            "migrate", "--guest", str(where.ctl), "--to", f"{self.addr[dst]}:{PORT}",
            "--pki", str(self.pki), "--json", "--link-rate", str(self.args.rate)], None)
        limit = self.args.migration_timeout
        if fault is not None:
            seen = trigger(fault.phase, client, dagent, d0)
            fired = self.hub.wait(lambda: seen() or ({} if client.eof else None), limit)
            if fired:
                run.fired = str(fired.get("phase") or fired.get("event"))
                self.fire(run, client, host, h0, dst, d0)
                dagent = self.agents[dst]
                d0 = 0 if fault.fault == "dst-killed" else d0
            else:
                run.fired = ""
        host_killed = bool(run.fired) and fault is not None and fault.fault == "src-host-killed"
        self.wait_end(run, client, host, h0, limit, host_killed)
        if host_killed and not host_is_agent:
            # what a killed `xmig guest start` leaves is its crashed guest's: no process
            # of xmig runs there any more to clean it up (its disk is the guest's disk)
            self.ignored |= {where.dir, where.ctl}
        elif host_killed:
            self.ignored.add(where.dir)  # the crashed guest's disk (its restarted agent owns
            # the rest: the stale control socket counts)
        # the destination's word on this session: it hosts the guest, or gave it up
        if dagent.find(event_is("incoming"), d0):
            self.hub.wait(lambda: True if dagent.eof or dagent.find(dst_gave_up, d0) else None,
                          self.args.settle_timeout)
        self.inspect(run, where)
        run.seconds = time.monotonic() - t0
        return run

    def fire(self, run: Run, client: Proc, host: Proc, h0: int, dst: str, d0: int) -> None:
        fault = run.fault
        assert fault is not None
        if fault.fault in ("link-cut", "link-stall"):
            assert fault.seconds is not None
            dagent = self.agents[dst]
            t0 = time.monotonic()
            self.wan.cut()
            try:
                if fault.fault == "link-cut":  # until both sides gave up, at most --cut
                    self.hub.wait(lambda: True if (
                        (client.eof or host.find(event_is("migration-ended"), h0))
                        and dagent.find(lambda e: e.get("event") in DST_GAVE_UP, d0)
                    ) else None, fault.seconds)
                else:  # the stall's length (lines arriving meanwhile are kept)
                    self.hub.wait(lambda: None, fault.seconds)
            finally:
                self.wan.restore()
                run.cut_s = round(time.monotonic() - t0, 2)
        elif fault.fault == "dst-killed":
            self.agents[dst].kill()
            self.start_agent(dst)
        elif fault.fault == "src-killed":
            client.kill()
        elif fault.fault == "src-host-killed":
            host.kill()
            side = OTHER[dst]
            if host is self.agents[side]:
                self.start_agent(side)

    def wait_end(self, run: Run, client: Proc, host: Proc, h0: int, limit: float,
                 host_killed: bool) -> None:
        """The migration's end as the client reports it, or (client killed) as the host
        does; then, in doubt, the host's settlement."""
        if not client.killed:
            if self.hub.wait(lambda: True if client.eof else None, limit) is None:
                run.issues.append(f"xmig migrate did not end in {limit:.0f} s")
                client.kill()
            run.rc = client.popen.returncode
            report = next((e for e in reversed(client.lines) if "event" not in e
                           and "status" in e), None)
            if report is not None:
                run.status = str(report["status"])
                lost = report.get("lost_acknowledged_writes")
                run.lost = int(lost) if isinstance(lost, int) else 0
                dt = report.get("downtime_ms")
                run.downtime_ms = float(dt) if isinstance(dt, int | float) else None
        if run.status is None and host_killed:
            run.status = "host-killed"
        if run.status is None:
            ended = self.hub.wait(lambda: host.find(event_is("migration-ended"), h0) or (
                {"status": "host-exited"} if host.eof else None), limit)
            run.status = str((ended or {"status": "no-end"})["status"])
        if run.status == "in-doubt":
            got = self.hub.wait(lambda: host.find(event_is("settled"), h0) or (
                {"decision": "host-exited"} if host.eof else None), self.args.settle_timeout)
            run.settled = str((got or {"decision": "unsettled"})["decision"])

    # -- inspection ----------------------------------------------------------------------------

    def statuses(self) -> list[tuple[str, Path, dict[str, Any]]]:
        """Every guest host that answers at a control socket in the workdirs."""
        out = []
        for side, root in self.roots():
            for ctl in sorted(root.glob("*.ctl")) if root.is_dir() else []:
                with contextlib.suppress(XmigError, OSError):
                    out.append((side, ctl, hostctl.request(ctl, "status", timeout=10,
                                                           probe_timeout=10)))
        return out

    def roots(self) -> Iterator[tuple[str, Path]]:
        yield "A", self.workdir["A"]
        yield "B", self.workdir["B"]
        for wd in self.starts:
            yield wd.name[0], wd

    def inspect(self, run: Run, before: Location) -> None:
        found = self.statuses()
        running = [(s, c, st) for s, c, st in found if st.get("guest_state") == "running"]
        held = [(s, c, st) for s, c, st in found if st.get("state") == "in-doubt"]
        if run.settled == "unsettled" or held:
            run.issues.append("left in doubt: " + ", ".join(
                f"{s}:{st.get('state')}" for s, _, st in held) if held else
                "left in doubt (source host never settled)")
        for side in ("A", "B"):
            agent = self.agents[side]
            if not agent.alive and not agent.killed:
                run.issues.append(f"agent {side} exited (rc {agent.popen.returncode})")
                self.start_agent(side)
        if len(running) > 1:
            run.issues.append("both sides run the guest: " + ", ".join(
                f"{s}:{c.name}" for s, c, _ in running))
            run.ended_on = "both"
            self.guest = None
        elif not running:
            run.ended_on = "none"
            if not held:
                run.issues.append("the guest runs nowhere and no host can resume it")
            self.guest = None
        else:
            side, ctl, st = running[0]
            run.ended_on = side
            host = self.host_of(int(st["host_pid"]))
            gdir = Path(st["workdir"])
            if host is None:
                run.issues.append(f"the guest runs under a process this bench did not "
                                  f"start (pid {st['host_pid']})")
            else:
                if gdir != before.dir:
                    self.chain.append(next(iter(sorted(gdir.glob("*.ledger"))),
                                           gdir / "guest.ledger"))
                self.guest = Location(side, host, ctl, gdir, int(st["guest_pid"]))
        expected = {"done": run.dst, "aborted": run.src}.get(str(run.status))
        if run.settled in ("go", "abandoned"):
            expected = run.dst if run.settled == "go" else run.src
        if expected is not None and run.ended_on in ("A", "B") and run.ended_on != expected:
            run.issues.append(f"the source said {run.status}"
                              f"{'/' + run.settled if run.settled else ''}, "
                              f"the guest runs on {run.ended_on}")
        if self.guest is not None:
            new = self.check_ledgers(self.guest.dir / "disk.raw")
            run.lost = max(run.lost, len(new))
        if run.lost:
            run.issues.append(f"{run.lost} acknowledged writes lost")
        if run.ended_on == "both":
            self.stop_all_guests(found)
        if self.guest is None and run.ended_on == "none" and held:
            self.stop_all_guests(found)
        run.leaks = self.leaks_settled()
        if run.leaks:
            run.issues.append(f"leaked: {', '.join(run.leaks)}")
        if self.guest is None:
            self.start_guest(run.src)

    def stop_all_guests(self, found: list[tuple[str, Path, dict[str, Any]]]) -> None:
        """To go on after a failure that left the guest nowhere or twice: stop every copy
        (a fresh guest follows); their hosts' cleanup then is not counted as a leak."""
        for _, ctl, _ in found:
            with contextlib.suppress(XmigError, OSError):
                hostctl.request(ctl, "stop", timeout=30)
        self.known_leaks |= self.leak_set()

    def host_of(self, pid: int) -> Proc | None:
        for agent in self.agents.values():
            if agent.pid == pid:
                return agent
        if self.guest is not None and self.guest.host.pid == pid:
            return self.guest.host
        return None

    def check_ledgers(self, disk: Path) -> set[int]:
        """Acknowledged writes (the ledgers of every host the guest ran on) missing from the
        disk of the side that runs it; new ones only. The guest runs on: a write it made
        since its ledger was read may cover an older one, so what fails is read again once
        the ledger has grown (by one flush, 64 records) and only what fails twice counts."""
        first = self._ledger_lost(disk)
        if not first:
            return set()
        live = self.chain[-1]
        size = _size(live)
        deadline = time.monotonic() + 10.0
        while _size(live) < size + 64 * RECORD.size and time.monotonic() < deadline:
            time.sleep(POLL_S)  # a poll of a file's size, bounded by the deadline
        lost = first & self._ledger_lost(disk)
        new = lost - self.lost_seqs
        self.lost_seqs |= lost
        return new

    def _ledger_lost(self, disk: Path) -> set[int]:
        entries: list[LedgerEntry] = []
        for path in self.chain:
            with contextlib.suppress(OSError, ValueError):
                entries.extend(read_ledger(path))
        try:
            fd = os.open(disk, os.O_RDONLY)
        except OSError:
            return set()
        try:
            check = verify_ledger(entries, lambda off, n: os.pread(fd, n, off))
        finally:
            os.close(fd)
        return {e.seq for e in check.lost}

    def leaks_settled(self) -> list[str]:
        """Leaks not seen before, once what is being cleaned up has had LEAK_GRACE_S."""
        deadline = time.monotonic() + LEAK_GRACE_S
        while True:
            new = self.leak_set() - self.known_leaks
            if not new or time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)  # a poll of the process table and files, with a deadline
        self.known_leaks |= new
        for item in new:
            kind = item.split(":", 1)[0]
            self.leaked[{"process": "processes", "socket": "sockets", "file": "files",
                         "cgroup": "cgroups"}[kind]] += 1
        return sorted(new)

    def leak_set(self) -> set[str]:
        """What belongs to no live guest, host or agent of this run."""
        g = self.guest
        live_pids = {a.pid for a in self.agents.values() if a.alive}
        mapped: set[str] = set()
        if g is not None:
            live_pids |= {g.host.pid, g.guest_pid}
            for pid in (g.host.pid, g.guest_pid):
                mapped |= _shm_maps(pid)
        out: set[str] = set()
        for pid, what in _processes_in(self.netns):
            if pid not in live_pids:
                out.add(f"process:{pid}:{what}")
        for _, root in self.roots():
            for path in _walk(root):
                try:
                    mode = path.lstat().st_mode
                except OSError:
                    continue
                mine = (g is not None and (path == g.ctl or path.parent == g.dir)) or (
                    path in self.ignored or path.parent in self.ignored) or (
                    path == root / "agent.ctl")  # the agent's own (xmig resolve's)
                if stat.S_ISSOCK(mode) and not mine:
                    out.add(f"socket:{path.relative_to(self.root)}")
                elif stat.S_ISREG(mode) and IMAGES.match(path.name) and not mine:
                    out.add(f"file:{path.relative_to(self.root)}")
        shm = Path(f"/dev/shm/xmig-{os.geteuid()}")
        for path in sorted(shm.iterdir()) if shm.is_dir() else []:
            m = SHM_NAME.search(path.name)
            if m and int(m.group(1)) in self.my_pids and str(path) not in mapped:
                out.add(f"file:{path}")
        for base in (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")):
            for cg in base.glob("xmig-*") if base.is_dir() else []:
                tail = cg.name.rsplit("-", 1)[-1]
                if tail.isdigit() and int(tail) in self.my_pids:
                    out.add(f"cgroup:{cg}")
        return out


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _walk(root: Path) -> Iterator[Path]:
    for top, dirs, files in os.walk(root):
        for name in (*files, *dirs):
            yield Path(top) / name


def _processes_in(netns: set[int]) -> Iterator[tuple[int, str]]:
    """(pid, what) of every process in the given network namespaces (zombies too)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino not in netns:
                continue
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace").strip()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        what = " ".join(a for a in cmd.split() if not a.startswith("/"))[:80] or "?"
        yield int(entry), (f"zombie {what}" if state == "Z" else what)


def _shm_maps(pid: int) -> set[str]:
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    return {line.split(None, 5)[5].strip() for line in text.splitlines()
            if "/dev/shm/" in line and len(line.split(None, 5)) == 6}


# -- the run -----------------------------------------------------------------------------------

def soaker(args: argparse.Namespace, wan: Wan, root: Path) -> Soak:
    """The backend's soak: the reference guest's (:class:`Soak`) or QEMU's (soak_qemu)."""
    if args.backend == "qemu":
        from soak_qemu import QemuSoak

        return QemuSoak(args, wan, root)
    return Soak(args, wan, root)


def soak(args: argparse.Namespace) -> dict[str, Any]:
    faults = plan(args.migrations, args.seed, args.faults, args.fault_share, args.cut,
                  args.stall_max)
    spec = LinkSpec.symmetric(rate_bps=args.rate, rtt_s=args.rtt)
    root = Path(tempfile.mkdtemp(prefix="xmig-soak-", dir=args.workdir))
    t0 = time.monotonic()
    runs: list[Run] = []
    try:
        with Wan(spec, fallback="tun") as wan:
            s = soaker(args, wan, root)
            try:
                s.setup()
                for i in range(args.migrations):
                    run = s.migrate(i, faults.get(i))
                    runs.append(run)
                    print(f"soak: {json.dumps(run.brief())}", file=sys.stderr, flush=True)
            finally:
                s.close()
            leaked = dict(s.leaked)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return {
        "migrations": len(runs),
        "completed": sum(r.outcome == "completed" for r in runs),
        "aborted_clean": sum(r.outcome == "aborted_clean" for r in runs),
        "failures": sum(r.outcome == "failure" for r in runs),
        "both_running": sum(r.ended_on == "both" for r in runs),
        "none_running": sum(r.ended_on == "none" and any("runs nowhere" in x for x in r.issues)
                            for r in runs),
        "lost_acknowledged_writes": sum(r.lost for r in runs),
        "leaked": leaked,
        "seconds": round(time.monotonic() - t0, 1),
        "faults": [{"index": r.index, "fault": r.fault.fault, "phase": r.fault.phase,
                    "fired": bool(r.fired), "cut_s": r.cut_s,
                    "outcome": r.outcome, "ended_on": r.ended_on, "status": r.status,
                    **({"settled": r.settled} if r.settled else {}),
                    **({"issues": r.issues} if r.issues else {})}
                   for r in runs if r.fault is not None],
        "runs": [r.brief() for r in runs],
        "seed": args.seed, "backend": args.backend,
        "link": {"rate_bps": args.rate, "rtt_s": args.rtt, "mode": "tun"},
        "guest": args.guest_desc,
        "workdir": str(root) if args.keep else None,
        "versions": versions(),
    }


def table(res: dict[str, Any]) -> str:
    lines = [f"{'#':>4} {'from':>4} {'to':>3} {'fault':<16} {'phase':<10} {'status':<9} "
             f"{'on':<4} {'s':>6}  outcome"]
    for r in res["runs"]:
        lines.append(f"{r['index']:>4} {r['from']:>4} {r['to']:>3} {r.get('fault', ''):<16} "
                     f"{r.get('phase', ''):<10} {r['status'] or '':<9} "
                     f"{r['ended_on'] or '':<4} {r['seconds']:>6.1f}  {r['outcome']}"
                     + (f": {'; '.join(r['issues'])}" if r.get("issues") else ""))
    lines.append(f"{res['migrations']} migrations: {res['completed']} completed, "
                 f"{res['aborted_clean']} aborted cleanly, {res['failures']} failures; "
                 f"both_running {res['both_running']}, none_running {res['none_running']}, "
                 f"lost writes {res['lost_acknowledged_writes']}, leaked {res['leaked']}, "
                 f"{res['seconds']} s")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--backend", choices=["sim", "qemu"], default="sim")
    ap.add_argument("--migrations", type=int, default=20, metavar="N")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rate", type=argtype(parse_bit_rate), default="200mbit",
                    help="link rate (default %(default)s)")
    ap.add_argument("--rtt", type=argtype(parse_duration), default="20ms",
                    help="link round-trip time (default %(default)s)")
    ap.add_argument("--faults", default=",".join(FAULTS),
                    help=f"comma-separated, from {', '.join(ALL_FAULTS)} (default "
                    "%(default)s)")
    ap.add_argument("--fault-share", type=float, default=1 / 3,
                    help="share of the migrations given a fault (default 1/3)")
    ap.add_argument("--cut", type=argtype(parse_duration), default="90s",
                    help="longest link-cut (it ends once both sides gave the session up); "
                    "keep it above the session's resume deadline (60 s) plus its idle "
                    "timeout (5 s) (default %(default)s)")
    ap.add_argument("--stall-max", type=argtype(parse_duration), default="20s",
                    help="longest link-stall, from 1 s (default %(default)s)")
    ap.add_argument("--migration-timeout", type=argtype(parse_duration), default="600s",
                    help="a migration not ended by then counts as hung (default %(default)s)")
    ap.add_argument("--settle-timeout", type=argtype(parse_duration), default="180s",
                    help="how long a source left in doubt may take to settle (default "
                    "%(default)s)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the run's directory is made (default: the temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the run's directory (logs)")
    ap.add_argument("--guest-build", type=Path, default=Path(
        os.environ.get("XMIG_GUEST_BUILD") or Path(__file__).resolve().parent.parent
        / "build" / "guest"), help="--backend qemu: the test guest's kernel and initramfs "
        "(make guest-image; default $XMIG_GUEST_BUILD or build/guest)")
    ap.add_argument("--qemu-sdps", choices=["on", "off"], default="off",
                    help="--backend qemu: xmig migrate --sdps (default %(default)s, as "
                    "xmig migrate --qemu-qmp's)")
    args = ap.parse_args(argv)
    args.faults = tuple(f.strip() for f in args.faults.split(",") if f.strip())
    bad = [f for f in args.faults if f not in ALL_FAULTS]
    if bad or not args.faults:
        ap.error(f"--faults: unknown {bad}; known: {', '.join(ALL_FAULTS)}")
    if args.migrations < 1:
        ap.error("--migrations must be at least 1")
    if args.backend == "qemu" and "src-host-killed" in args.faults:
        ap.error("--faults: src-host-killed is the reference guest's (--backend sim)")
    args.guest_desc = " ".join(GUEST)
    if args.backend == "qemu":
        from soak_qemu import guest_desc

        args.guest_desc = guest_desc()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.backend == "qemu" and not all(
            (args.guest_build / f).is_file() for f in ("vmlinuz", "initramfs.cpio.gz")):
        print(f"soak: --backend qemu needs the test guest in {args.guest_build} (make "
              "guest-image, or --guest-build DIR)", file=sys.stderr)
        return 2
    if not tun_available():
        print("soak: needs root and /dev/net/tun (the TUN emulator's namespaces)",
              file=sys.stderr)
        return 2
    # stdout carries the one JSON object only
    with contextlib.redirect_stdout(sys.stderr):
        res = soak(args)
    if args.json:
        print(json.dumps(res, indent=1))
        print(table(res), file=sys.stderr)
    else:
        print(table(res))
    return 0 if res["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
