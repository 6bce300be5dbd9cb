"""``xmig migrate --qemu-qmp SOCKET``: this process is the source agent of a running QEMU.

It attaches to the QEMU by its QMP socket (:func:`~xmig.guest.qemu.attach.attach_qemu`:
nothing is changed by that), connects to the destination agent (``xmig agent --qemu-kernel
…``) over mutually authenticated TLS and migrates the guest with
:func:`~xmig.orchestrator.run.migrate_qemu`. Its journal and the mirror's shadow image go to
``workdir``. Once the destination runs the guest, the source QEMU (paused since
pre-switchover, never run again) is told to quit, unless ``keep_source``. Nothing is created
before attaching succeeded; then ``workdir`` is made private (0700, the journal 0600). Before GO any
failure leaves the source QEMU running (MigrationAborted). After GO without RESUMED the
destination may be waiting in doubt: this process reaches its agent again with the
journaled GO (and the RAM repair) until it answers (:mod:`~xmig.orchestrator.qemusettle`).
Aborted in the blackout without the destination's word that it heard ABORT, it keeps
telling it for up to ``abort_delivery_s`` (3 minutes) before it exits
(:mod:`xmig.orchestrator.settling`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmig.errors import (
    ConfigError,
    EpochAbandoned,
    GuestNotFound,
    GuestStateError,
    MigrationAborted,
    XmigError,
)
from xmig.guest.backend import Outcome
from xmig.guest.qemu.attach import attach_qemu
from xmig.guest.qemu.machine import QemuGuest
from xmig.guest.qemu.migrate import QemuMigrationOptions, QemuSourceResult, controller_config
from xmig.guest.qemu.plan import qemu_guest_rates
from xmig.orchestrator.plan import Plan, make_plan
from xmig.orchestrator.qemusettle import send_qemu_decision
from xmig.orchestrator.report import Report, qemu_source_report
from xmig.orchestrator.run import migrate_qemu
from xmig.orchestrator.settling import AgentAddress, keep_telling
from xmig.orchestrator.source import journaled_decision, send_decision
from xmig.private import FILE_MODE, create_file, private_dir, unix_listener
from xmig.protocol.journal import Journal
from xmig.service import hostctl
from xmig.transport import SessionConfig, connect
from xmig.transport.certs import PkiPaths
from xmig.transport.tls import client_context

SETTLE_MAX_BACKOFF_S = 10.0


@dataclass(frozen=True)
class QemuMigrateRequest:
    """What ``xmig migrate --qemu-qmp`` was asked."""

    qmp: Path
    to: str
    pki: Path
    workdir: Path
    server_name: str | None = None
    streams: int = 2
    bandwidth_bps: int | None = None
    connect_timeout_s: float = 10.0
    keep_source: bool = False
    #: after an abort in the blackout that the destination may not have heard, how long
    #: this process keeps telling it (the source QEMU runs meanwhile)
    abort_delivery_s: float = 180.0
    options: QemuMigrationOptions = field(default_factory=QemuMigrationOptions)


async def migrate_attached(req: QemuMigrateRequest,
                           on_event: Callable[[dict[str, Any]], None] = lambda e: None
                           ) -> Report:
    """Migrate the QEMU at ``req.qmp`` to the agent at ``req.to``; the report. Typed errors:
    attaching (GuestNotFound, QemuError, QemuCapabilityError, DiskFormatError, ...), the
    PKI (ConfigError), the agent (PeerUnreachable, its refusal), the migration
    (MigrationAborted: the source runs on)."""
    tls = client_context(PkiPaths.in_dir(req.pki.absolute(), role="client"))
    host, port = hostctl.parse_endpoint(req.to)
    workdir = req.workdir.absolute()
    source = await attach_qemu(req.qmp, workdir=workdir)  # creates nothing
    name = source.config.name
    result: QemuSourceResult | None = None
    wire: dict[str, Any] = {}
    arrived = False  #: the destination runs the guest (RESUMED, or settled)
    try:
        prepare_workdir(workdir)
        on_event({"event": "attached", "name": name, "pid": source.pid,
                  "ram_mb": source.config.ram_mb, "disk_bytes": source.disk_bytes})
        config = SessionConfig(rate_cap_bps=float(req.bandwidth_bps)
                               if req.bandwidth_bps else None)
        on_event({"event": "connecting", "to": req.to})
        started = time.monotonic()
        try:
            async with connect(host, port, tls=tls, server_hostname=req.server_name or host,
                               streams=req.streams, config=config,
                               connect_timeout=req.connect_timeout_s) as session:
                on_event({"event": "connected", "peer": f"{host}:{port}"})
                journal = Journal(workdir / "journal")
                result = await migrate_qemu(session, source, migration=name, journal=journal,
                                            workdir=workdir, options=req.options,
                                            on_progress=lambda e: on_event(e.to_json()))
                wire = session.stats()
                if result.status is Outcome.IN_DOUBT and not result.committed_at:
                    on_event({"event": "in-doubt", "error": result.error})
        except XmigError as err:
            if result is None and not _go_journaled(workdir, name):
                if isinstance(err, MigrationAborted) and err.abort_unconfirmed:
                    await _deliver_abort(req, name, on_event)
                raise
            if result is None:
                on_event({"event": "in-doubt", "error": f"{type(err).__name__}: {err}"})
            # GO is journaled: the destination has the guest (or will, once it hears GO)
        settled = result is None or not result.resumed_at
        ending = await _settle(req, source, on_event) if settled else Settled.RESUMED
        timeline = [] if result is None else [e.to_json() for e in result.timeline]
        where = {"name": name, "to": req.to}
        if ending in (Settled.ABANDONED, Settled.FORCED_ABORT):
            # this copy is the only one: it runs on
            await source.cont()
            return Report(status="aborted", backend="qemu", error=ending.why,
                          timeline=timeline, details={**where, "settled": True})
        arrived = True
        total_s = time.monotonic() - started
        if result is None or ending is Settled.FORCED_GO:
            return Report(status="done", backend="qemu", total_s=round(total_s, 3),
                          timeline=timeline, details={
                              **where, "settled": True, "forced": ending is Settled.FORCED_GO})
        report = qemu_source_report(
            result, total_s=total_s, wire=wire,
            guest_bytes=(source.config.ram_mb << 20) + (source.disk_bytes or 0))
        report.status = "done"  # it runs there
        report.details.update(where, source="kept paused" if req.keep_source else "quit",
                              settled=settled)
        return report
    finally:
        if arrived and not req.keep_source:
            await source.quit()  # the destination runs it: this copy never runs again
        else:
            with contextlib.suppress(XmigError):
                await source.detach()


async def plan_attached(req: QemuMigrateRequest, seconds: float,
                        on_event: Callable[[dict[str, Any]], None] = lambda e: None) -> Plan:
    """Forecast migrating the QEMU at ``req.qmp`` to the agent at ``req.to``
    (:mod:`xmig.orchestrator.plan`): the guest measured for ``seconds``, then the link. Reads
    only; nothing is created. Errors as :func:`migrate_attached`'s before it migrates."""
    tls = client_context(PkiPaths.in_dir(req.pki.absolute(), role="client"))
    host, port = hostctl.parse_endpoint(req.to)
    source = await attach_qemu(req.qmp, workdir=req.workdir.absolute())
    try:
        config = controller_config(req.options)
        cap = req.bandwidth_bps / 8 if req.bandwidth_bps else None
        on_event({"event": "connecting", "to": req.to})
        async with connect(host, port, tls=tls, server_hostname=req.server_name or host,
                           streams=req.streams, connect_timeout=req.connect_timeout_s,
                           config=SessionConfig(rate_cap_bps=float(req.bandwidth_bps)
                                                if req.bandwidth_bps else None)) as session:
            on_event({"event": "measuring", "guest": source.config.name, "seconds": seconds})
            return await make_plan(qemu_guest_rates(source, seconds=seconds), session,
                                   seconds=seconds, config=config, rate_cap_Bps=cap)
    finally:
        with contextlib.suppress(XmigError):
            await source.detach()


def prepare_workdir(workdir: Path) -> None:
    """Make ``workdir`` (journal, mirror image, sockets: a guest's disk writes and the power
    to decide its migration) private: a directory of mode 0700, the journal 0600.
    ConfigError when it cannot be made, or is not ours and open to others."""
    try:
        private_dir(workdir, exist_ok=True)
        st = os.stat(workdir)
    except OSError as err:
        raise ConfigError(f"--workdir {workdir} cannot be made: {err.strerror or err}") from err
    if st.st_uid != os.geteuid() and st.st_mode & 0o077:
        raise ConfigError(f"--workdir {workdir} belongs to uid {st.st_uid} and is open to "
                          f"others (mode {stat.S_IMODE(st.st_mode):04o}): xmig keeps the "
                          "migration's journal, disk writes and sockets there; give a "
                          "directory of its own")
    journal = workdir / "journal"
    try:
        os.close(create_file(journal))
    except FileExistsError:
        jst = os.lstat(journal)
        if not stat.S_ISREG(jst.st_mode):
            raise ConfigError(f"{journal} is not a regular file") from None
        if jst.st_uid == os.geteuid():
            os.chmod(journal, FILE_MODE)
    except OSError as err:
        raise ConfigError(f"cannot create {journal}: {err.strerror or err}") from err


def _go_journaled(workdir: Path, migration: str) -> bool:
    """Whether the newest record of ``migration`` in the source's journal is GO."""
    for rec in reversed(Journal(workdir / "journal").records()):
        if rec.migration == migration:
            return rec.kind == "GO"
    return False


def _agent(req: QemuMigrateRequest) -> AgentAddress:
    host, port = hostctl.parse_endpoint(req.to)
    return AgentAddress(host, port, req.pki, req.server_name, req.connect_timeout_s)


def _retrying(on_event: Callable[[dict[str, Any]], None], event: str, **fields: Any
              ) -> Callable[[float, XmigError], None]:
    def retry(delay: float, err: XmigError) -> None:
        on_event({"event": event, "in_s": delay, **fields,
                  "error": f"{type(err).__name__}: {err}"})
    return retry


class Settled(enum.Enum):
    """How a source QEMU left in doubt (GO journaled, no RESUMED) ended."""

    RESUMED = "resumed"  #: the destination runs the guest
    ABANDONED = "abandoned"  #: the destination restarted without its copy: this one runs
    FORCED_GO = "forced-go"  #: an operator said the destination runs it (xmig resolve)
    FORCED_ABORT = "forced-abort"  #: an operator said this one runs (xmig resolve)

    @property
    def why(self) -> str:
        return {Settled.ABANDONED: "EpochAbandoned: the destination restarted without its "
                "paused copy and abandoned the epoch; the source QEMU runs on",
                Settled.FORCED_ABORT: "forced abort by an operator (xmig resolve): the "
                "source QEMU runs on"}.get(self, self.value)


async def _settle(req: QemuMigrateRequest, source: QemuGuest,
                  on_event: Callable[[dict[str, Any]], None]) -> Settled:
    """GO is journaled and unconfirmed: reach the agent again and tell it (with the RAM
    repair), retrying with backoff until it answers RESUMED, or that it abandoned the epoch
    (restarted without its paused copy; journaled here too). Meanwhile the migration is
    listed by ``xmig resolve --workdir WORKDIR`` (this process answers at ``WORKDIR/
    NAME.ctl``), which may force a side instead. Anything else (unreachable, nothing known
    there) keeps the source QEMU paused and this process retrying."""
    name = source.config.name
    journal = Journal(req.workdir.absolute() / "journal")
    epoch = journaled_decision(journal, name).epoch
    doubt = _InDoubtControl(req.workdir.absolute() / f"{name}.ctl", name, epoch, req.to,
                            journal, source)
    telling = asyncio.ensure_future(keep_telling(
        _agent(req), lambda s: send_qemu_decision(s, journal, name, source.mem_path),
        on_retry=_retrying(on_event, "settle-retry", in_doubt=True),
        final=(EpochAbandoned,), max_retry_s=SETTLE_MAX_BACKOFF_S))
    waiting: set[asyncio.Future[Any]] = {telling, doubt.forced}
    async with doubt.serving():
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if doubt.forced.done():
        telling.cancel()
        await asyncio.wait({telling})
        ending = doubt.forced.result()
        on_event({"event": "forced", "decision": ending.value})
        return ending
    try:
        decision = telling.result()
    except EpochAbandoned as err:
        journal.append("ABANDONED", name, epoch, reason=str(err))
        on_event({"event": "settled", "decision": "abandoned", "note": str(err)})
        return Settled.ABANDONED
    on_event({"event": "settled", "decision": decision.type})
    return Settled.RESUMED


class _InDoubtControl:
    """The control socket of a source QEMU in doubt (:mod:`xmig.service.hostctl`): ``status`` lists
    the migration for ``xmig resolve``; ``resolve`` journals FORCED, continues the source
    QEMU for ``abort``, and ends the settling (:attr:`forced`)."""

    def __init__(self, ctl: Path, name: str, epoch: int, to: str, journal: Journal,
                 source: QemuGuest) -> None:
        self.ctl, self.name, self.epoch, self.to = ctl, name, epoch, to
        self.journal, self.source = journal, source
        self.forced: asyncio.Future[Settled] = asyncio.get_running_loop().create_future()

    def status(self) -> dict[str, Any]:
        state = {None: "in-doubt", Settled.FORCED_GO: "migrated",
                 Settled.FORCED_ABORT: "running"}[
            self.forced.result() if self.forced.done() else None]
        doubt = None if self.forced.done() else {
            "migration": self.name, "epoch": self.epoch, "to": self.to, "role": "source",
            "backend": "qemu"}
        return {"name": self.name, "role": "source", "backend": "qemu", "state": state,
                "pid": os.getpid(), "in_doubt": doubt}

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        hostctl.claim_socket(self.ctl)
        server = await asyncio.start_unix_server(self._on_client,
                                                 sock=unix_listener(self.ctl))
        try:
            yield
        finally:
            server.close()
            with contextlib.suppress(OSError):
                self.ctl.unlink()

    async def _force(self, req: hostctl.ResolveRequest) -> None:
        if self.forced.done():
            raise GuestStateError(f"migration {self.name} was decided already")
        if req.migration != self.name:
            raise GuestNotFound(f"no migration {req.migration} is in doubt here (this "
                                f"process's is {self.name})")
        self.journal.append("FORCED", self.name, self.epoch, decision=req.force,
                            reason="forced by an operator (xmig resolve)")
        if req.force == "abort":
            await self.source.cont()
        self.forced.set_result(Settled.FORCED_GO if req.force == "go"
                               else Settled.FORCED_ABORT)

    async def _on_client(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        await hostctl.answer_status_or_resolve(reader, writer, who="a source QEMU in doubt",
                                               status=self.status, force=self._force)


async def _deliver_abort(req: QemuMigrateRequest, name: str,
                         on_event: Callable[[dict[str, Any]], None]) -> None:
    """The source QEMU runs again, and ABORT may not have reached a destination that voted
    READY (it holds a paused QEMU until told): tell it, with backoff, until it answers
    DISCARDED or GuestNotFound (nothing of it there), for at most ``abort_delivery_s``."""
    journal = Journal(req.workdir.absolute() / "journal")
    epoch = journaled_decision(journal, name).epoch
    note = "the destination discarded its copy"
    try:
        async with asyncio.timeout(req.abort_delivery_s):
            await keep_telling(
                _agent(req), lambda s: send_decision(s, journal, name, epoch=epoch),
                on_retry=_retrying(on_event, "abort-retry"), final=(GuestNotFound,),
                max_retry_s=SETTLE_MAX_BACKOFF_S)
    except GuestNotFound as err:
        note = f"the destination holds nothing of it ({err})"
    except TimeoutError:
        on_event({"event": "abort-undelivered", "epoch": epoch, "note": (
            f"the destination did not answer ABORT within {req.abort_delivery_s:g} s and "
            f"may hold a paused copy: `xmig resolve --workdir DIR --migration {name} "
            "--force abort` on its host discards it")})
        return
    on_event({"event": "abort-delivered", "epoch": epoch, "note": note})
