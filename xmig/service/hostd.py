"""The guest host: the process that runs a reference guest and its migrations, like libvirtd.

``xmig guest start`` runs one :class:`GuestHost` for a fresh guest (:func:`start_source`);
``xmig agent`` (:mod:`xmig.service.agentd`) runs one per guest that arrived. A host owns the guest
process, its disk image, the NBD server that serves the disk to it, the guest's journal and
a control socket ``DIR/NAME.ctl`` speaking :mod:`xmig.service.hostctl` (status, stop, migrate).

On ``migrate`` the host opens the TLS session to the destination agent itself
(:func:`xmig.transport.connect`, client certificate from the PKI directory), runs
:func:`xmig.guest.sim.source.migrate` and streams its progress events to the client, then the
final report (:mod:`xmig.orchestrator.report`). The migration belongs to the host, not to the
client: a
client that goes away does not stop it. Afterwards:

- done (GO sent, destination running): the guest is discarded here and the host exits 0;
- aborted, or refused before it began (bad PKI, agent unreachable, guest busy): the guest
  runs on, untouched, and the host keeps serving;
- in doubt (GO was journaled, so this side never resumes on its own: I1, and the
  destination has not confirmed it runs): the host keeps the paused guest and its state
  (state ``in-doubt``), refuses new migrations, and keeps reaching the destination agent
  with GO (:func:`xmig.guest.sim.source.send_decision`, with backoff). RESUMED: the guest runs
  there and is discarded here. ``EpochAbandoned`` (the agent restarted and journaled that
  this epoch never runs there): ABANDONED is journaled and the paused guest resumes here,
  state ``running``. Stopped before either, it exits 1.

Stopping (``stop``, SIGTERM, SIGINT) quits the guest and ends the host; it waits for a
migration in progress to end first. Files stay in the guest's directory (disk image,
ledger, journal, log); the guest's shared memory files and the sockets are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xmig import guestctl
from xmig.errors import (
    ConfigError,
    EpochAbandoned,
    GuestNotFound,
    GuestStateError,
    InDoubt,
    MigrationAborted,
    XmigError,
)
from xmig.guest.sim import Progress, SimConfig, SimGuest, make_disk_image
from xmig.guest.sim.source import MigrationOptions, SimSourceResult, controller_config
from xmig.orchestrator.plan import make_plan, sim_guest_rates
from xmig.orchestrator.report import aborted_report, downtime_estimate, ledger_check, source_report
from xmig.orchestrator.run import migrate
from xmig.orchestrator.settling import AgentAddress, keep_telling
from xmig.orchestrator.source import send_decision
from xmig.private import private_dir, unix_listener
from xmig.protocol.journal import Journal
from xmig.protocol.switchover import SourceMachine, SourcePhase
from xmig.service import hostctl
from xmig.storage.nbd import NbdServer
from xmig.storage.raw import RawFileBackend
from xmig.transport import SessionConfig, connect
from xmig.transport.certs import PkiPaths
from xmig.transport.tls import client_context

MiB = 1 << 20
PAGE = 4096
SAMPLE_S = 0.25  #: the host samples its guest's progress this often (rate before a migration)
SETTLE_MAX_BACKOFF_S = 30.0  #: retrying to tell an in-doubt destination GO, at most this apart
Emit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class GuestSpec:
    """What ``xmig guest start`` asks for."""

    name: str
    workdir: Path
    ram_bytes: int = 256 * MiB
    disk_bytes: int = 256 * MiB
    workload: str = "oltp"
    rate_Bps: float = 60e6
    disk_rate_Bps: float = 4e6
    seed: int = 1
    udp: tuple[str, int] | None = None




async def start_source(spec: GuestSpec, emit: Emit) -> GuestHost:
    """Start a fresh guest whose disk ``DIR/NAME/disk.raw`` is served by xmig's NBD server;
    the host is ready to :meth:`GuestHost.serve`."""
    name = hostctl.check_name(spec.name)
    gdir = spec.workdir.absolute() / name
    ctl = spec.workdir.absolute() / f"{name}.ctl"
    sock = hostctl.check_socket_path(gdir / "disk.nbd")
    config = SimConfig(  # validates every value (ConfigError) before anything is created
        ram_bytes=spec.ram_bytes, workload=spec.workload, rate_Bps=spec.rate_Bps,
        disk_rate_Bps=spec.disk_rate_Bps if spec.workload == "oltp" else 0.0,
        hotset_bytes=max(PAGE, min(64 * MiB, spec.ram_bytes // 4) // PAGE * PAGE),
        seed=spec.seed, udp_addr=spec.udp, disk_url=f"nbd+unix:///?socket={sock}",
        disk_bytes=spec.disk_bytes)
    hostctl.claim_socket(ctl)
    try:
        private_dir(gdir, exist_ok=True)
        disk = RawFileBackend(make_disk_image(gdir / "disk.raw", spec.disk_bytes))
    except OSError as err:
        raise ConfigError(f"cannot create the guest's files in {gdir}: {err}") from err
    nbd = NbdServer(disk)
    try:
        await nbd.start_unix(sock)
        guest = await asyncio.to_thread(SimGuest.start, config, workdir=gdir, name=name)
    except BaseException:
        await nbd.close()
        disk.close()
        raise
    return GuestHost(name=name, role="source", workdir=gdir, ctl=ctl, guest=guest, disk=disk,
                     nbd=nbd, journal=Journal(gdir / "journal"), emit=emit)


class GuestHost:
    """One hosted guest and its control socket. :meth:`serve` runs until the guest is
    stopped or has migrated away and returns the process's exit status."""

    def __init__(self, *, name: str, role: str, workdir: Path, ctl: Path, guest: SimGuest,
                 disk: RawFileBackend, nbd: NbdServer, journal: Journal, emit: Emit) -> None:
        self.name, self.role, self.workdir, self.ctl = name, role, workdir, ctl
        self.guest, self.disk, self.nbd, self.journal = guest, disk, nbd, journal
        self.emit = emit
        self.state = "running"  #: running migrating migrated in-doubt stopped failed
        self.rc = 0
        self.migration: dict[str, Any] | None = None
        self._started = time.monotonic()
        self._samples: deque[tuple[float, int]] = deque(maxlen=int(2 / SAMPLE_S) + 1)
        self._done = asyncio.Event()
        self._stop_after_migration = False
        self._torn_down = False
        self._tg: asyncio.TaskGroup | None = None
        self._settler: asyncio.Task[None] | None = None
        self._in_doubt: dict[str, Any] | None = None  #: migration, epoch, to: while in doubt
        #: migration, epoch, to: while an ABORT is being told to a destination that may
        #: hold a paused copy (the guest runs here)
        self._abort_pending: dict[str, Any] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def serve(self) -> int:
        hostctl.claim_socket(self.ctl)
        server = await asyncio.start_unix_server(self._on_client, sock=unix_listener(self.ctl))
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                watcher = tg.create_task(self._watch())
                self.emit({"event": "ready", **self._identity()})
                await self._done.wait()
                watcher.cancel()
                if self._settler is not None:
                    self._settler.cancel()
        finally:
            server.close()
            with contextlib.suppress(OSError):
                self.ctl.unlink()
            await self._teardown("stopped" if self.state in ("running", "migrating")
                                 else self.state)
        self.emit({"event": "exit", "name": self.name, "state": self.state, "rc": self.rc})
        return self.rc

    def request_stop(self) -> None:
        """Stop the guest and end the host (after a migration in progress)."""
        if self.state == "migrating":
            self._stop_after_migration = True
            self.emit({"event": "note", "name": self.name,
                       "note": "stopping once the migration has ended"})
        elif self._tg is not None:
            self._tg.create_task(self._stop())
        else:
            self._done.set()

    async def _stop(self) -> None:
        await self._teardown("stopped")
        self._done.set()

    async def _teardown(self, state: str) -> None:
        """Quit the guest (it flushes through NBD), close NBD, close the disk; once the guest
        runs elsewhere ("migrated") its image here is deleted too (an agent that guests pass
        through would otherwise fill its disk with their copies). Idempotent."""
        if self._torn_down:
            return
        self._torn_down = True
        self.state = state
        await asyncio.to_thread(self.guest.quit)
        await self.nbd.close()
        self.disk.close()
        if state == "migrated":
            with contextlib.suppress(FileNotFoundError):
                self.disk.path.unlink()

    async def _watch(self) -> None:
        """Sample the guest's progress; end the host if the guest process dies."""
        while True:
            if self.state == "running" and self.guest.process.poll() is not None:
                self.emit({"event": "guest-failed", "name": self.name,
                           "rc": self.guest.process.returncode, "log": str(self.guest.log_path)})
                self.rc = 1
                await self._teardown("failed")
                self._done.set()
                return
            with contextlib.suppress(XmigError):
                self._samples.append((time.monotonic(), self.guest.progress().counter))
            await asyncio.sleep(SAMPLE_S)  # a sampling period

    def _rate_before(self) -> float | None:
        """Guest progress units per second over the last ~2 s."""
        p = self.guest.progress()
        now = time.monotonic()
        if self._samples and now - self._samples[0][0] >= 0.2:
            t0, c0 = self._samples[0]
            return (p.counter - c0) / (now - t0)
        return p.rate or None

    # -- the control socket ---------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        udp = self.guest.udp_address
        return {"name": self.name, "role": self.role, "ctl": str(self.ctl),
                "workdir": str(self.workdir), "host_pid": os.getpid(),
                "guest_pid": self.guest.pid, "udp": f"{udp[0]}:{udp[1]}" if udp else None}

    def status(self) -> dict[str, Any]:
        out = {**self._identity(), "state": self.state, "guest_state": self.guest.state,
               "ram_bytes": self.guest.config.ram_bytes, "disk_bytes": self.disk.size,
               "workload": self.guest.config.workload,
               "uptime_s": round(time.monotonic() - self._started, 3),
               "migration": self.migration, "in_doubt": self._in_doubt,
               "abort_pending": self._abort_pending}
        with contextlib.suppress(XmigError):
            p = self.guest.progress()
            out.update(progress=p.counter, progress_rate=p.rate, throttle=p.throttle,
                       dirty_rate_Bps=p.dirty_rate_Bps, disk_writes=p.disk_writes)
        return out

    async def _on_client(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(10.0):
                    line = await reader.readuntil(b"\n")
                req = hostctl.parse_request(line)
            except (XmigError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    TimeoutError) as err:
                bad = err if isinstance(err, XmigError) else ConfigError(
                    f"no request line: {type(err).__name__}")
                writer.write(hostctl.encode({"ok": False, "error": hostctl.error_dict(bad)}))
                await writer.drain()
                return
            if isinstance(req, hostctl.StatusRequest):
                writer.write(hostctl.encode({"ok": True, "status": self.status()}))
            elif isinstance(req, hostctl.ResolveRequest):
                try:
                    await self._force(req)
                except XmigError as err:
                    writer.write(hostctl.encode({"ok": False, "error": hostctl.error_dict(err)}))
                else:
                    writer.write(hostctl.encode({"ok": True, "status": self.status()}))
            elif isinstance(req, hostctl.StopRequest):
                if self.state not in ("running", "in-doubt"):
                    busy = GuestStateError(f"guest {self.name} is {self.state}; stop it after")
                    writer.write(hostctl.encode({"ok": False,
                                                 "error": hostctl.error_dict(busy)}))
                else:
                    self.rc = 1 if self.state == "in-doubt" else self.rc
                    await self._teardown("stopped")
                    writer.write(hostctl.encode({"ok": True, "status": self.status()}))
                    await writer.drain()
                    self._done.set()
            elif req.plan_s is not None:
                await self._serve_plan(req, writer)
            else:
                await self._serve_migrate(req, writer)
            await writer.drain()
        except (OSError, ConnectionError):
            pass  # the client went away
        finally:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

    async def _serve_migrate(self, req: hostctl.MigrateRequest,
                             writer: asyncio.StreamWriter) -> None:
        if self.state != "running" or self._tg is None:
            err = GuestStateError(f"guest {self.name} is {self.state}, not running")
            writer.write(hostctl.encode({"ok": False, "error": hostctl.error_dict(err)}))
            return
        self.state = "migrating"
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        delivered = asyncio.Event()
        self._tg.create_task(self._migrate(req, queue.put_nowait, delivered))
        alive = True
        try:
            while True:
                item = await queue.get()
                if alive:
                    try:
                        writer.write(hostctl.encode(item))
                        await writer.drain()
                    except (OSError, ConnectionError):
                        alive = False  # the migration goes on without its client
                if "ok" in item:
                    return
        finally:
            delivered.set()

    async def _serve_plan(self, req: hostctl.MigrateRequest,
                          writer: asyncio.StreamWriter) -> None:
        """Forecast migrating the guest as ``req`` says (:mod:`xmig.orchestrator.plan`):
        measure it, then the link to the agent; the guest runs on untouched."""
        assert req.plan_s is not None
        if self.state != "running":
            err = GuestStateError(f"guest {self.name} is {self.state}, not running")
            writer.write(hostctl.encode({"ok": False, "error": hostctl.error_dict(err)}))
            return
        host, port = req.endpoint
        config = controller_config(_options(req))
        cap = req.bandwidth_bps / 8 if req.bandwidth_bps else None
        try:
            tls = client_context(PkiPaths.in_dir(Path(req.pki), role="client"))
            writer.write(hostctl.encode({"event": "connecting", "to": req.to}))
            async with connect(host, port, tls=tls, server_hostname=req.server_name or host,
                               streams=req.streams, connect_timeout=req.connect_timeout_s,
                               config=_session_config(req)) as session:
                writer.write(hostctl.encode({"event": "measuring", "guest": self.name,
                                             "seconds": req.plan_s}))
                rates = sim_guest_rates(self.guest, self.disk, seconds=req.plan_s,
                                        seed=self.guest.config.seed)
                plan = await make_plan(rates, session, seconds=req.plan_s, config=config,
                                       rate_cap_Bps=cap)
        except XmigError as err:
            writer.write(hostctl.encode({"ok": False, "error": hostctl.error_dict(err)}))
            return
        self.emit({"event": "planned", "name": self.name, "to": req.to,
                   "converges": plan.forecast.converges})
        writer.write(hostctl.encode({"ok": True, "plan": plan.to_json()}))

    # -- the migration --------------------------------------------------------------------

    async def _migrate(self, req: hostctl.MigrateRequest, put: Emit,
                       delivered: asyncio.Event) -> None:
        self.migration = {"to": req.to, "phase": "connecting", "started_at": time.time()}
        self.emit({"event": "migrating", "name": self.name, "to": req.to})
        timeline: list[dict[str, Any]] = []
        seen_resumed = [0.0]

        def event(e: dict[str, Any]) -> None:
            if e.get("note") == "destination running":
                seen_resumed[0] = time.monotonic()
            if self.migration is not None:
                self.migration["phase"] = e.get("phase", self.migration["phase"])
            timeline.append(e)
            put(e)

        epoch = self.journal.next_epoch()
        unconfirmed_abort = False
        try:
            report = await self._run(req, event, put, timeline, seen_resumed)
            reply: dict[str, Any] = {"ok": True, "report": report}
            ended = "migrated"
            if report.get("status") == "in-doubt":
                ended = "in-doubt"
                reply = {"ok": False, "report": report, "error": hostctl.error_dict(InDoubt(
                    f"GO was given and the destination has not confirmed that the guest runs "
                    f"there ({report.get('error')}): this host keeps the paused guest and "
                    f"keeps telling the destination until it answers; see `xmig guest "
                    f"status --guest {self.ctl}`"), after_go=True)}
        except Exception as err:  # typed errors, and a bug must not take the guest down
            after_go = any(r.kind == "GO" and r.epoch == epoch for r in self.journal.records())
            status = "in-doubt" if after_go else "aborted"
            unconfirmed_abort = isinstance(err, MigrationAborted) and err.abort_unconfirmed
            if not after_go:
                await self._ensure_running()
            if not isinstance(err, XmigError | OSError):
                self.emit({"event": "internal-error", "name": self.name,
                           "error": f"{type(err).__name__}: {err}"})
            aborted = aborted_report(err, backend="sim", source_running=self.guest.running,
                                     timeline=timeline, to=req.to)
            aborted.status = status
            report = aborted.to_json()
            reply = {"ok": False, "error": hostctl.error_dict(err, after_go=after_go),
                     "report": report}
            ended = status if after_go else "running"
        self.emit({"event": "migration-ended", "name": self.name, "status": report["status"],
                   "error": report.get("error")})
        put(reply)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10.0):
                await delivered.wait()
        self.migration = None
        if ended == "migrated":  # the destination runs it
            await self._teardown("migrated")
            self._done.set()
            return
        # in doubt the paused guest is kept until the destination's word: RESUMED (it runs
        # there: discarded here) or that it abandoned the epoch (it resumes here); before GO
        # it simply runs on
        self.state = ended
        if self._stop_after_migration:
            self.rc = 1 if ended == "in-doubt" else self.rc
            await self._stop()
        elif ended == "in-doubt" and self._tg is not None:
            self._in_doubt = {"migration": self.name, "epoch": epoch, "to": req.to,
                              "role": "source"}
            self._settler = self._tg.create_task(self._settle(req, epoch))
        elif unconfirmed_abort and self._tg is not None:
            self._abort_pending = {"migration": self.name, "epoch": epoch, "to": req.to}
            self._tg.create_task(self._deliver_abort(req, epoch))

    async def _settle(self, req: hostctl.MigrateRequest, epoch: int) -> None:
        """GO is journaled and unconfirmed: reach the destination agent again and tell it,
        with backoff, until it answers (:func:`xmig.orchestrator.settling.keep_telling`). RESUMED:
        the
        guest runs there and is discarded here. EpochAbandoned (it restarted without its
        paused copy, and journaled that it never runs it): ABANDONED is journaled here and
        the paused guest resumes. Anything else (unreachable, nothing known there) keeps
        the guest paused and in doubt."""
        try:
            decision = await keep_telling(
                _agent(req), lambda s: send_decision(s, self.journal, self.name, epoch=epoch),
                on_retry=self._retrying("settle-retry"), final=(EpochAbandoned,),
                max_retry_s=SETTLE_MAX_BACKOFF_S)
        except EpochAbandoned as err:
            await self._resume_abandoned(epoch, err)
            return
        self.emit({"event": "settled", "name": self.name, "decision": decision.type})
        await self._discard_here()

    async def _deliver_abort(self, req: hostctl.MigrateRequest, epoch: int) -> None:
        """The guest runs here again, and ABORT may not have reached a destination that
        voted READY (it holds a paused copy until told): tell it, with backoff, until it
        answers DISCARDED, or GuestNotFound (nothing of it there)."""
        note = "the destination discarded its copy"
        try:
            await keep_telling(
                _agent(req), lambda s: send_decision(s, self.journal, self.name, epoch=epoch),
                on_retry=self._retrying("abort-retry"), final=(GuestNotFound,),
                max_retry_s=SETTLE_MAX_BACKOFF_S)
        except GuestNotFound as err:
            note = f"the destination holds nothing of it ({err})"
        finally:
            self._abort_pending = None
        self.emit({"event": "abort-delivered", "name": self.name, "epoch": epoch,
                   "note": note})

    def _retrying(self, event: str) -> Callable[[float, XmigError], None]:
        def retry(delay: float, err: XmigError) -> None:
            self.emit({"event": event, "name": self.name, "in_s": delay,
                       "error": f"{type(err).__name__}: {err}"})
        return retry

    async def _resume_abandoned(self, epoch: int, err: EpochAbandoned) -> None:
        """The destination journaled that ``epoch`` never runs there: this paused copy is
        the only one. Journal that, then resume it; it may be migrated again."""
        self.journal.append("ABANDONED", self.name, epoch, reason=str(err))
        await self._resume_here(epoch)
        self.emit({"event": "settled", "name": self.name, "decision": "abandoned",
                   "note": "the destination abandoned the epoch; the guest runs here again"})

    async def _resume_here(self, epoch: int) -> None:
        """``epoch`` never runs at the destination (its record journaled by the caller):
        this paused copy is the only one. It resumes and may be migrated again."""
        step = SourceMachine.in_doubt(epoch).abandoned(epoch)
        assert step.phase is SourcePhase.ABORTED
        await guestctl.call(self.guest.resume)
        self.state, self._in_doubt = "running", None

    async def _discard_here(self) -> None:
        """The destination runs the guest: the paused copy is discarded, the host ends."""
        self._in_doubt = None
        await self._teardown("migrated")
        self._done.set()

    async def _force(self, req: hostctl.ResolveRequest) -> None:
        """An operator decides a migration in doubt here (the destination's site is gone):
        journaled (FORCED) first. ``abort``: the paused guest resumes here (the operator
        vouches that the destination never runs it); ``go``: the guest is the
        destination's, the paused copy is discarded and the host ends."""
        doubt = self._in_doubt
        if doubt is None or self.state != "in-doubt":
            raise GuestStateError(f"guest {self.name} is {self.state}: no migration is in "
                                  "doubt here")
        if req.migration != doubt["migration"]:
            raise GuestNotFound(f"no migration {req.migration} is in doubt here (this host's "
                                f"is {doubt['migration']})")
        if self._settler is not None:
            self._settler.cancel()
            await asyncio.wait({self._settler})
        epoch = int(doubt["epoch"])
        self.journal.append("FORCED", self.name, epoch, decision=req.force,
                            reason="forced by an operator (xmig resolve)")
        self.emit({"event": "forced", "name": self.name, "decision": req.force,
                   "epoch": epoch})
        self.rc = 0
        if req.force == "abort":
            await self._resume_here(epoch)
        else:
            await self._discard_here()

    async def _run(self, req: hostctl.MigrateRequest, event: Emit, put: Emit,
                   timeline: list[dict[str, Any]], seen_resumed: list[float]
                   ) -> dict[str, Any]:
        host, port = req.endpoint
        options = _options(req)
        tls = client_context(PkiPaths.in_dir(Path(req.pki), role="client"))
        config = _session_config(req)
        rate_before = self._rate_before()
        put({"event": "connecting", "to": req.to})
        result: SimSourceResult | None = None
        try:
            async with connect(host, port, tls=tls, server_hostname=req.server_name or host,
                               streams=req.streams, config=config,
                               connect_timeout=req.connect_timeout_s) as session:
                put({"event": "connected", "peer": f"{host}:{port}", "streams": req.streams})
                before, t_before = self.guest.progress(), time.monotonic()
                result = await migrate(session, self.guest, self.disk, self.nbd,
                                       migration=self.name, journal=self.journal,
                                       options=options,
                                       on_progress=lambda e: event(e.to_json()))
                wire = session.stats()
                total_s = time.monotonic() - t_before
        except XmigError:
            if result is None:
                raise
            # the session failed as it closed, after the migration had ended: nothing lost
        assert result is not None
        try:
            return await self._report(req, result, wire, total_s, before, t_before,
                                      rate_before, timeline, seen_resumed[0])
        except Exception as err:  # the migration is done; only a figure is missing
            return {"status": result.status, "report_error": f"{type(err).__name__}: {err}",
                    "name": self.name, "to": req.to, "timeline": timeline}

    async def _report(self, req: hostctl.MigrateRequest, result: SimSourceResult,
                      wire: dict[str, Any], total_s: float, before: Progress, t_before: float,
                      rate_before: float | None, timeline: list[dict[str, Any]],
                      seen_resumed: float) -> dict[str, Any]:
        options = _options(req)
        after = self.guest.progress()  # frozen at the pause
        srtt = wire.get("srtt_s")
        downtime, basis = downtime_estimate(
            last_progress=after.last_progress_mono, paused_at=result.paused_at,
            peer_resumed_at=result.resumed_at, resumed_seen_at=seen_resumed,
            srtt_s=float(srtt) if isinstance(srtt, int | float) else None)
        check = await asyncio.to_thread(ledger_check, self.guest.ledger_path, self.disk)
        report = source_report(
            result, total_s=total_s, downtime_s=downtime, client_downtime_s=None,
            rate_before=rate_before,
            rate_during=(after.counter - before.counter)
            / max(result.paused_at - t_before, 1e-9),
            wire=wire, guest_bytes=self.guest.config.ram_bytes + self.disk.size,
            link_rate_bps=req.link_rate_bps or req.bandwidth_bps, ledger=check,
            verify=req.verify, options={**options.__dict__, "streams": req.streams,
                                        "bandwidth_bps": req.bandwidth_bps})
        report.downtime_basis = basis
        report.details.update(name=self.name, to=req.to)
        report.timeline = timeline
        return report.to_json()

    async def _ensure_running(self) -> None:
        """After a failure before GO: no mirror hook, no throttle, the guest not paused (what
        migrate's abort does; again here in case it did not get to it)."""
        self.nbd.hook = None
        with contextlib.suppress(XmigError):
            self.guest.set_throttle(0.0)
            if self.guest.paused:
                await guestctl.call(self.guest.resume)


def _options(req: hostctl.MigrateRequest) -> MigrationOptions:
    """What the engine is asked, from the client's request."""
    return MigrationOptions(max_downtime_s=req.max_downtime_s, timeout_s=req.timeout_s,
                            sdps=req.sdps, verify=req.verify,
                            blackout_timeout_s=req.blackout_timeout_s,
                            max_penalty=req.max_penalty)


def _session_config(req: hostctl.MigrateRequest) -> SessionConfig:
    """The session to the agent, capped at the request's ``--bandwidth``."""
    return SessionConfig(rate_cap_bps=float(req.bandwidth_bps) if req.bandwidth_bps else None)


def _agent(req: hostctl.MigrateRequest) -> AgentAddress:
    host, port = req.endpoint
    return AgentAddress(host, port, Path(req.pki), req.server_name, req.connect_timeout_s)
