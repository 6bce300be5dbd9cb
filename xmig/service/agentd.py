"""The destination agent (``xmig agent``): accepts migrations and hosts the guests that arrive.

Each session is received (:func:`xmig.orchestrator.run.receive_migration`) into a new private
directory ``DIR/incoming-<8 random hex>/`` (0700; image, NBD socket, ledger, journal, guest
log under names this agent chooses, 0600), so an arriving guest never touches the files of
one already here, and nothing a source says becomes a path. Once it runs here, a
:class:`~xmig.service.hostd.GuestHost` hosts it exactly as ``xmig guest start`` does, with the
control socket ``DIR/NAME.ctl`` (0600): NAME is the migration's label (a source host sets
it to its guest's name; the protocol lets only ``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`` through),
``NAME-2``, ``NAME-3``, ... when that socket is taken. The guest can be migrated onward.

Without ``once`` the agent listens and hosts until SIGTERM or SIGINT, which stop every
guest it hosts and cut a migration still arriving (before GO its source keeps the guest).
With ``once`` it takes one migration (later ones are refused): if that fails it exits 1; if
it succeeds it hosts the guest until that is stopped or migrated away, then exits with the
host's status (0).

A migration left in doubt (the destination voted READY and lost the source before GO, when
:func:`~xmig.orchestrator.destination.run_destination` raises ``InDoubt``) keeps its paused guest
in this
process, which then does not exit by itself, even with ``once``, until the source reaches
it again with a session that opens with its journaled decision
(:func:`xmig.orchestrator.source.send_decision`, which the source host retries on its
own): GO runs
and hosts the guest here, ABORT discards it. An operator may decide instead (``xmig
resolve``, when the source's site is gone): the agent's own control socket ``DIR/agent.ctl``
(:mod:`xmig.service.hostctl`) answers ``status`` (the migrations in doubt here) and ``resolve`` (a
forced GO or ABORT, journaled as FORCED; the source's contrary decision is refused after).

A QEMU guest (``--qemu-kernel``/``--qemu-initrd`` given; refused otherwise) is received by
:func:`~xmig.orchestrator.run.receive_qemu` into a QEMU this agent starts, and hosted
until that QEMU quits (its QMP socket, in the ``hosting`` line, is the operator's); in doubt,
it is settled the same way (:func:`~xmig.orchestrator.destination.settle` on its
:class:`~xmig.guest.qemu.receive.QemuDest`).

A source settles only after it gave up the migration's session; when its decision arrives
while that session is still open here (the link was cut, and this side has not noticed:
it would wait out the session's resume deadline, a minute, with the paused guest), that
session is ended at once, so the migration is in doubt (after READY) or discarded (before)
and the decision applies now. Only for the migration's epoch and token, from the identity
that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import ssl
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

from xmig.errors import (
    ConfigError,
    GuestNotFound,
    GuestStateError,
    InDoubt,
    ProtocolError,
    XmigError,
)
from xmig.guest.backend import Arrival, DestBackend, DestResult
from xmig.guest.qemu import leftover
from xmig.guest.qemu.machine import QemuConfig
from xmig.guest.qemu.receive import HOST_QMP, QemuDestResult
from xmig.guest.sim.dest import SimDestResult
from xmig.hostpolicy import HostPolicy
from xmig.orchestrator import recovery
from xmig.orchestrator.destination import first_message, force, settle
from xmig.orchestrator.probe import answer_probe
from xmig.orchestrator.run import receive_migration, receive_qemu
from xmig.private import fsync_dir, private_dir, unix_listener
from xmig.protocol import control
from xmig.protocol.journal import Journal
from xmig.protocol.switchover import DestPhase
from xmig.service import hostctl
from xmig.service.hostctl import NAME_RE, claim_socket
from xmig.service.hostd import Emit, GuestHost
from xmig.transport import Channel, Listener, PeerPolicy, TransportSession, listen
from xmig.transport.certs import PkiPaths
from xmig.transport.tls import server_context

log = logging.getLogger(__name__)


async def serve_agent(*, host: str, port: int, pki_dir: Path, workdir: Path, once: bool,
                      emit: Emit, qemu: QemuConfig | None = None,
                      max_ram_bytes: int | None = None, max_disk_bytes: int | None = None,
                      allow: tuple[str, ...] = ()) -> int:
    """Run the agent until it is told to stop (or, with ``once``, its guest has gone);
    returns the process's exit status. Bad PKI, address or directory: ConfigError.
    ``qemu``: how to start a destination QEMU (binary, kernel, initrd; the source's RAM,
    vCPUs and command line are its own); without it QEMU migrations are refused.
    ``max_ram_bytes``/``max_disk_bytes``: what one arriving guest may have (None: the
    host's available memory, the workdir's free space); ``allow``: glob patterns on the
    client certificate's subject DN or SANs (none: every certificate the CA signed)."""
    tls = server_context(PkiPaths.in_dir(pki_dir, role="server"))
    peers = PeerPolicy(allow=tuple(allow))  # ConfigError for a bad pattern
    workdir = workdir.absolute()
    policy = HostPolicy(max_ram_bytes=max_ram_bytes, max_disk_bytes=max_disk_bytes)
    try:
        private_dir(workdir, exist_ok=True)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=64)
    except OSError as err:
        raise ConfigError(f"cannot listen on {host}:{port} (workdir {workdir}): "
                          f"{err.strerror or err}") from err
    sock.setblocking(False)
    try:
        lock = recovery.lock_workdir(workdir)
    except BaseException:
        sock.close()
        raise
    try:
        _recover(workdir, emit)
        return await _Agent(workdir, once, emit, qemu, policy, peers).run(sock, tls)
    finally:
        os.close(lock)


def _recover(workdir: Path, emit: Emit) -> None:
    """Settle what an earlier run of an agent left in ``workdir`` (:func:`recovery.recover`)
    and remove the control sockets of the guests that died with it. A QEMU that held an
    abandoned or discarded migration and outlived the agent is killed first."""
    for held in recovery.recover(workdir, release=leftover.reap):
        if held.phase is DestPhase.ABANDONED:
            emit({"event": "abandoned", "migration": held.migration, "epoch": held.epoch,
                  "dir": str(held.dir), "note": "READY journaled by an earlier run, whose "
                  "paused guest is gone: this epoch never runs here; its source may resume"})
        else:
            emit({"event": "discarded", "migration": held.migration, "epoch": held.epoch,
                  "dir": str(held.dir), "note": "cut off mid-receive by the end of an "
                  "earlier run"})
    for ctl in sorted(workdir.glob("*.ctl")):
        with contextlib.suppress(XmigError, OSError):
            claim_socket(ctl)  # a live one (not ours) stays: claim_socket refuses it


#: the agent's own control socket in its workdir (xmig.service.hostctl: status, resolve)
AGENT_CTL = "agent.ctl"
#: how long a superseded receiving session has to end (its guest then in doubt or discarded)
SUPERSEDE_WAIT_S = 30.0


@dataclass
class _Live:
    """A migration's receiving session, open here."""

    session: TransportSession
    epoch: int
    token: str
    owner: str
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def settled_by(self, decision: control.Go | control.Abort, peer_key: str) -> bool:
        """Whether ``decision``, arriving from ``peer_key``, is this migration's source's."""
        return (decision.epoch == self.epoch and peer_key == self.owner
                and control.token_matches(decision.token, self.token))


class _Agent:
    def __init__(self, workdir: Path, once: bool, emit: Emit, qemu: QemuConfig | None,
                 policy: HostPolicy, peers: PeerPolicy) -> None:
        self.workdir, self.once, self.emit, self.qemu = workdir, once, emit, qemu
        self.policy, self.peers = policy, peers
        self.hosts: dict[str, GuestHost] = {}
        self.receiving: set[asyncio.Task[None]] = set()
        #: migrations left in doubt here, by migration id: (backend, journal, directory)
        self.in_doubt: dict[str, tuple[DestBackend, Journal, Path]] = {}
        self.live: dict[str, _Live] = {}  #: receiving sessions, by migration id
        self.ctl = workdir / AGENT_CTL
        self.stopping = asyncio.Event()
        self.taken = False  #: a migration was accepted (with once, the only one)
        self.rc = 0

    async def run(self, sock: socket.socket, tls: ssl.SSLContext) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            async with listen(tls=tls, sock=sock, policy=self.peers) as lst, \
                    asyncio.TaskGroup() as tg:
                addr = sock.getsockname()
                self.emit({"event": "ready", "role": "agent", "listen": f"{addr[0]}:{addr[1]}",
                           "port": addr[1], "pid": os.getpid(), "workdir": str(self.workdir)})
                acceptor = tg.create_task(self._accept(lst, tg))
                ctl = await asyncio.start_unix_server(
                    lambda r, w: self._on_ctl(r, w, tg), sock=unix_listener(self.ctl))
                try:
                    await self.stopping.wait()
                finally:
                    ctl.close()
                    with contextlib.suppress(OSError):
                        self.ctl.unlink()
                acceptor.cancel()
                if self.in_doubt:
                    self.emit({"event": "warning", "in_doubt": sorted(self.in_doubt),
                               "note": "stopping: guests in doubt are lost with this process"})
                for task in list(self.receiving):
                    task.cancel()
                for host in list(self.hosts.values()):
                    host.request_stop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        self.emit({"event": "exit", "role": "agent", "rc": self.rc})
        return self.rc

    # -- the control socket: migrations in doubt, an operator's forced decision -----------

    def _status(self) -> dict[str, Any]:
        doubts = [{"migration": m, "epoch": b.result.epoch, "role": "destination",
                   "backend": _backend_name(b.result), "dir": str(d), "owner": b.result.owner}
                  for m, (b, _, d) in self.in_doubt.items()]
        return {"role": "agent", "pid": os.getpid(), "workdir": str(self.workdir),
                "hosting": sorted(self.hosts), "in_doubt": doubts}

    async def _on_ctl(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      tg: asyncio.TaskGroup) -> None:
        await hostctl.answer_status_or_resolve(
            reader, writer, who="the agent's control socket", status=self._status,
            force=lambda req: self._force(req, tg))

    async def _force(self, req: hostctl.ResolveRequest, tg: asyncio.TaskGroup) -> None:
        """An operator decides a migration in doubt here (its source's site is gone):
        journaled (FORCED) before it acts. ``go`` runs and hosts the guest here, ``abort``
        discards it; either way a later contrary decision of the source is refused from the
        journal (:func:`xmig.orchestrator.recovery.answer`): GO after a forced abort with
        EpochAbandoned (the source resumes its copy), ABORT after a forced go as too late."""
        self.emit({"event": "forced", "migration": req.migration, "decision": req.force})
        if req.migration not in self.in_doubt:
            raise GuestNotFound(f"no migration {req.migration} is in doubt at this agent")
        backend, journal, sdir = self.in_doubt[req.migration]
        await force(backend, req.force, journal=journal,
                    on_event=lambda e: self.emit({**e.to_json(), "dir": str(sdir)}))
        self.in_doubt.pop(req.migration, None)
        if backend.result.status == Arrival.RUNNING:
            tg.create_task(self._host(backend.result, sdir, journal))
        else:
            self._ended(1)

    async def _accept(self, lst: Listener, tg: asyncio.TaskGroup) -> None:
        while True:  # with once, later sessions may only settle a migration in doubt
            session = await lst.accept()
            tg.create_task(self._receive(session))

    async def _receive(self, session: TransportSession) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.receiving.add(task)
        mine = False  #: this session took the agent's migration (with once, its only one)
        dest: DestResult | None = None
        try:
            first = await self._first(session)
            if first is None:
                return
            if isinstance(first, control.Probe):  # a source planning: not a migration
                self.emit({"event": "probe", "peer": session.peer, "seconds": first.seconds})
                dropped = await answer_probe(session, first)
                self.emit({"event": "probed", "peer": session.peer, "bytes": dropped})
                return
            if isinstance(first, control.Negotiate) and self.once and self.taken:
                self.emit({"event": "refused", "peer": session.peer,
                           "note": "--once: this agent took its migration already"})
                await session.send(Channel.CONTROL, control.Refused(
                    first.migration, "GuestStateError",
                    "this agent (--once) took its migration already").encode())
                return
            if isinstance(first, control.Negotiate):
                self.taken = mine = True
                sdir = self._new_incoming_dir()
                journal = Journal(sdir / "journal")
                self.emit({"event": "incoming", "peer": session.peer, "dir": str(sdir)})
                with self._receiving(session, first):
                    if isinstance(first.guest, control.QemuGuest):
                        dest = await self._receive_qemu(session, first, sdir, journal)
                    else:
                        dest = await self._negotiated(session, first, sdir, journal)
            else:  # a source settling: its GO or ABORT
                await self._supersede(first, session)
                if first.migration in self.in_doubt:
                    _, journal, sdir = self.in_doubt[first.migration]
                    dest = await self._settle(session, first)
                else:  # settled, or held by an earlier run
                    await self._answer_from_journals(session, first)
                    return
        except Exception as err:  # typed, or a bug: either way this session is over
            self.emit({"event": "session-failed", "error": f"{type(err).__name__}: {err}"})
            if mine and not self.in_doubt:
                self._ended(1)
            return
        finally:
            self.receiving.discard(task)
            await _done_with(session)
        if dest is not None:
            await self._host(dest, sdir, journal)

    async def _settle(self, session: TransportSession,
                      decision: control.Go | control.Abort) -> DestResult | None:
        """A source settling a guest left in doubt here: the guest to host (GO), or None
        (ABORT: discarded)."""
        sdir = self.in_doubt[decision.migration][2]
        self.emit({"event": "decision", "peer": session.peer, "decision": decision.type,
                   "migration": decision.migration})
        settled = await settle(session, decision, {
            k: (b, j) for k, (b, j, _) in self.in_doubt.items()},
            on_event=lambda e: self.emit({**e.to_json(), "dir": str(sdir)}))
        self.in_doubt.pop(decision.migration, None)
        if settled.result.status != Arrival.RUNNING:  # ABORT: discarded
            self._ended(1)
            return None
        return settled.result

    @contextlib.contextmanager
    def _receiving(self, session: TransportSession, first: control.Negotiate
                   ) -> Iterator[None]:
        """Known as ``first.migration``'s receiving session while the body runs."""
        live = _Live(session, first.epoch, first.token, session.peer_key)
        self.live[first.migration] = live
        try:
            yield
        finally:
            if self.live.get(first.migration) is live:
                del self.live[first.migration]
            live.ended.set()

    async def _supersede(self, decision: control.Go | control.Abort,
                         session: TransportSession) -> None:
        """``decision``'s migration still has its receiving session open here, and its
        source, settling, says that session is over: end it, and wait (bounded) until its
        migration is in doubt or discarded, so the decision applies to it now."""
        live = self.live.get(decision.migration)
        if live is None or not live.settled_by(decision, session.peer_key):
            return
        self.emit({"event": "superseded", "migration": decision.migration,
                   "peer": session.peer, "note": "its source settles it on a new session; "
                   "the session that received it is ended"})
        live.session.abort("superseded: the source settles this migration on a new session")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SUPERSEDE_WAIT_S):
                await live.ended.wait()

    async def _answer_from_journals(self, session: TransportSession,
                                    decision: control.Go | control.Abort) -> None:
        """A decision for a migration no guest here is held for: what the journals say
        (:func:`xmig.orchestrator.recovery.answer`): RESUMED if it ran here, EpochAbandoned if this
        agent abandoned it after a restart; GuestNotFound if nothing is known."""
        self.emit({"event": "decision", "peer": session.peer, "decision": decision.type,
                   "migration": decision.migration, "held": False})
        try:
            reply = recovery.answer(recovery.scan(self.workdir), decision,
                                   session.peer_key)
        except GuestNotFound as err:
            reply = control.Refused.of(decision.migration, err)
        if reply is None:
            return
        self.emit({"event": "answered", "migration": decision.migration, "reply": reply.type,
                   **({"error": reply.error} if isinstance(reply, control.Refused) else {})})
        with contextlib.suppress(XmigError, TimeoutError):
            async with asyncio.timeout(5.0):
                await session.send(Channel.CONTROL, reply.encode())
                await session.drain(Channel.CONTROL)

    def _new_incoming_dir(self) -> Path:
        """A new private directory for an arriving guest (short: sockets live in it)."""
        while True:
            with contextlib.suppress(FileExistsError):
                made = private_dir(self.workdir / f"incoming-{secrets.token_hex(4)}")
                fsync_dir(self.workdir)  # its entry survives a power loss with its journal
                return made

    async def _first(self, session: TransportSession
                     ) -> control.Negotiate | control.Go | control.Abort | control.Probe | None:
        """What the session is for; a first message that does not decode (or is not one a
        session may open with) is answered REFUSED, typed, and changes nothing."""
        try:
            return await first_message(session)
        except ProtocolError as err:
            self.emit({"event": "refused", "peer": session.peer,
                       "error": f"ProtocolError: {err}"})
            with contextlib.suppress(XmigError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await session.send(Channel.CONTROL, control.Refused.of("", err).encode())
            return None

    async def _negotiated(self, session: TransportSession, first: control.Negotiate,
                          sdir: Path, journal: Journal) -> DestResult | None:
        return await self._arrival(sdir, journal, {}, receive_migration(
            session, workdir=sdir, journal=journal, first=first, policy=self.policy,
            on_event=lambda e: self.emit({**e.to_json(), "dir": str(sdir)})))

    async def _arrival(self, sdir: Path, journal: Journal, label: dict[str, str],
                       receiving: Awaitable[DestResult]) -> DestResult | None:
        """The guest that arrived, or None: held in doubt (READY, then cut off from the
        source before GO: the paused guest may be the only copy; kept until the source's
        decision comes on a new session, and never exited for) or discarded."""
        try:
            return await receiving
        except InDoubt as err:
            assert isinstance(err.backend, DestBackend)
            self.in_doubt[err.migration] = (err.backend, journal, sdir)
            self.emit({"event": "in-doubt", "dir": str(sdir), "migration": err.migration,
                       **label, "error": f"{type(err).__name__}: {err}"})
            return None
        except XmigError as err:
            self.emit({"event": "discarded", "dir": str(sdir),
                       "error": f"{type(err).__name__}: {err}"})
            self._ended(1)
            return None

    async def _receive_qemu(self, session: TransportSession, first: control.Negotiate,
                            sdir: Path, journal: Journal) -> DestResult | None:
        """A QEMU guest: received by :func:`~xmig.orchestrator.run.receive_qemu` into a
        QEMU this agent starts; the caller hosts it until it quits (its QMP for the operator
        is ``DIR/incoming-*/guest.qmp``) or the agent stops."""
        if self.qemu is None:
            await session.send(Channel.CONTROL, control.Refused(
                first.migration, "ConfigError", "this agent was not told how to start QEMU "
                "(xmig agent --qemu-kernel K --qemu-initrd I)").encode())
            self.emit({"event": "refused", "peer": session.peer,
                       "note": "a QEMU guest, and no --qemu-kernel/--qemu-initrd"})
            self._ended(1)
            return None
        template = replace(self.qemu, name="guest", mem_path=sdir / "guest.ram")
        return await self._arrival(sdir, journal, {"backend": "qemu"}, receive_qemu(
            session, template, workdir=sdir, journal=journal, first=first,
            policy=self.policy, on_event=lambda e: self.emit({**e.to_json(), "dir": str(sdir)})))

    async def _host_qemu(self, dest: QemuDestResult, sdir: Path) -> None:
        guest = dest.guest
        assert guest is not None
        name = guest.config.name
        self.emit({"event": "hosting", "backend": "qemu", "name": name,
                   "qmp": str(guest.qmp_socket), "pid": guest.pid, "dir": str(sdir)})
        await guest.detach()  # its QMP is the operator's now
        migrated = asyncio.Event()
        monitor = sdir / HOST_QMP
        watching = asyncio.ensure_future(_watch_migrated_away(monitor, migrated))
        try:
            await guest.wait_gone(self.stopping)
        finally:
            watching.cancel()
            await asyncio.wait([watching])
        monitor.unlink(missing_ok=True)
        if migrated.is_set() and dest.image is not None:
            # it runs elsewhere now: its copy here would only fill this host's disk
            dest.image.unlink(missing_ok=True)
        self.emit({"event": "exit", "name": name, "backend": "qemu", "rc": 0,
                   "migrated": migrated.is_set()})
        self._ended(0)

    async def _host(self, dest: DestResult, sdir: Path, journal: Journal) -> None:
        """Host a guest that runs here: until it stops or migrates away."""
        if isinstance(dest, QemuDestResult):
            await self._host_qemu(dest, sdir)
            return
        assert isinstance(dest, SimDestResult)
        assert dest.guest is not None and dest.image is not None and dest.nbd is not None
        name = self._name_for(dest.migration)
        host = GuestHost(name=name, role="destination", workdir=sdir,
                         ctl=self.workdir / f"{name}.ctl", guest=dest.guest, disk=dest.image,
                         nbd=dest.nbd, journal=journal, emit=self.emit)
        self.hosts[name] = host
        if self.stopping.is_set():
            host.request_stop()
        try:
            rc = await host.serve()
        except XmigError as err:
            self.emit({"event": "host-failed", "name": name, "error": f"{err}"})
            rc = 1
        finally:
            self.hosts.pop(name, None)
        self._ended(rc)

    def _ended(self, rc: int) -> None:
        if self.once:
            self.rc = rc
            self.stopping.set()

    def _name_for(self, migration: str) -> str:
        base = migration if NAME_RE.match(migration) else f"guest-{secrets.token_hex(4)}"
        for n in range(1, 1000):
            name = base if n == 1 else f"{base}-{n}"
            if name in self.hosts:
                continue
            try:
                claim_socket(self.workdir / f"{name}.ctl")
            except (GuestStateError, ConfigError):
                continue
            return name
        return f"guest-{secrets.token_hex(8)}"


def _backend_name(result: DestResult) -> str:
    return "qemu" if isinstance(result, QemuDestResult) else "sim"


async def _watch_migrated_away(path: Path, migrated: asyncio.Event) -> None:
    """Set ``migrated`` when the hosted QEMU's outgoing migration completes (its MIGRATION
    event, which every monitor gets), clear it when the guest runs again (RESUME: that
    migration was aborted after QEMU's part of it): a QEMU that quits while it is set has
    left for another host. Until cancelled; a monitor that cannot be reached leaves
    ``migrated`` unset (the image is kept: when in doubt, nothing is deleted)."""
    client = QMPClient("xmig-agent")
    try:
        await client.connect(str(path))
        with client.listener(("MIGRATION", "RESUME")) as events:
            async for event in events:
                data: Any = event.get("data")
                if event["event"] == "RESUME":
                    migrated.clear()
                elif isinstance(data, dict) and data.get("status") == "completed":
                    migrated.set()
    except (QMPError, OSError, EOFError) as err:
        log.info("%s: not watching the hosted QEMU: %s", path, err)
    finally:
        with contextlib.suppress(QMPError, OSError, EOFError):
            await client.disconnect()


async def _done_with(session: TransportSession) -> None:
    """End a session this agent has no more use for (its guest, if any, is hosted without
    it), so a peer's sessions never outlive what they were for: an orderly close for up to
    2 s, cut short when the peer has gone (no connection left), then dropped."""
    closing = asyncio.ensure_future(session.close("done", timeout=2.0))
    gone = asyncio.ensure_future(session.wait_until(lambda: not session.session.connections))
    try:
        await asyncio.wait([closing, gone], timeout=2.5, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (closing, gone):
            task.cancel()
        done, _ = await asyncio.wait([closing, gone])
        for task in done:  # retrieved: a broken session's error is expected here
            if not task.cancelled():
                task.exception()
        session.abort("the agent is done with this session")
