"""The destination agent (``xmig agent``): accepts migrations and hosts the guests that arrive.

Each session is received (:func:`xmig.agent.receive_migration`) into its own directory
``DIR/incoming-XXXXXXXX/`` (image, ledger, journal, guest log), so an arriving guest never
touches the files of one already here. Once it runs here, a :class:`~xmig.hostd.GuestHost`
hosts it exactly as ``xmig guest start`` does, with the control socket ``DIR/NAME.ctl``:
NAME is the migration's name, which an xmig source host sets to its guest's name (``NAME-2``,
``NAME-3``, ... when that socket is taken). The guest can be migrated onward from there.

Without ``once`` the agent listens and hosts until SIGTERM or SIGINT, which stop every
guest it hosts and cut a migration still arriving (before GO its source keeps the guest).
With ``once`` it takes one migration and stops listening: if that fails it exits 1; if it
succeeds it hosts the guest until that is stopped or migrated away, then exits with the
host's status (0).

A migration left in doubt (the destination voted READY and lost the source before GO, when
:func:`~xmig.agent.receive_migration` raises ``InDoubt``) keeps its paused guest in this
process, which then does not exit by itself, even with ``once``: settling it with the
source's journaled decision is not wired to an operator command yet.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import ssl
from pathlib import Path

from xmig.agent import receive_migration
from xmig.errors import ConfigError, GuestStateError, XmigError
from xmig.hostctl import NAME_RE
from xmig.hostd import Emit, GuestHost, claim_socket
from xmig.journal import Journal
from xmig.transport import Listener, TransportSession, listen
from xmig.transport.certs import PkiPaths
from xmig.transport.tls import server_context


async def serve_agent(*, host: str, port: int, pki_dir: Path, workdir: Path, once: bool,
                      emit: Emit) -> int:
    """Run the agent until it is told to stop (or, with ``once``, its guest has gone);
    returns the process's exit status. Bad PKI, address or directory: ConfigError."""
    tls = server_context(PkiPaths.in_dir(pki_dir, role="server"))
    workdir = workdir.absolute()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=64)
    except OSError as err:
        raise ConfigError(f"cannot listen on {host}:{port} (workdir {workdir}): "
                          f"{err.strerror or err}") from err
    sock.setblocking(False)
    return await _Agent(workdir, once, emit).run(sock, tls)


class _Agent:
    def __init__(self, workdir: Path, once: bool, emit: Emit) -> None:
        self.workdir, self.once, self.emit = workdir, once, emit
        self.hosts: dict[str, GuestHost] = {}
        self.receiving: set[asyncio.Task[None]] = set()
        self.in_doubt: dict[str, object] = {}  #: DestResults left in doubt, by directory
        self.stopping = asyncio.Event()
        self.rc = 0

    async def run(self, sock: socket.socket, tls: ssl.SSLContext) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            async with listen(tls=tls, sock=sock) as lst, asyncio.TaskGroup() as tg:
                addr = sock.getsockname()
                self.emit({"event": "ready", "role": "agent", "listen": f"{addr[0]}:{addr[1]}",
                           "port": addr[1], "pid": os.getpid(), "workdir": str(self.workdir)})
                acceptor = tg.create_task(self._accept(lst, tg))
                await self.stopping.wait()
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

    async def _accept(self, lst: Listener, tg: asyncio.TaskGroup) -> None:
        while True:
            session = await lst.accept()
            tg.create_task(self._receive(session))
            if self.once:
                assert lst.server is not None
                lst.server.close()  # no new connections; this session's go on
                return

    async def _receive(self, session: TransportSession) -> None:
        sdir = self.workdir / f"incoming-{secrets.token_hex(4)}"
        journal = Journal(sdir / "journal")
        task = asyncio.current_task()
        assert task is not None
        self.receiving.add(task)
        self.emit({"event": "incoming", "peer": session.peer, "dir": str(sdir)})
        try:
            dest = await receive_migration(
                session, workdir=sdir, journal=journal,
                on_event=lambda e: self.emit({**e, "dir": str(sdir)}))
        except Exception as err:  # typed, or a bug: either way this session is over
            held = getattr(err, "result", None)
            if getattr(held, "status", None) == "in-doubt":
                # READY, then cut off from the source before GO: the paused guest (a child
                # of this process) may be the only copy. Keep it; never exit for it
                self.in_doubt[str(sdir)] = held
                self.emit({"event": "in-doubt", "dir": str(sdir),
                           "error": f"{type(err).__name__}: {err}"})
                return
            self.emit({"event": "discarded", "dir": str(sdir),
                       "error": f"{type(err).__name__}: {err}"})
            self._ended(1)
            return
        finally:
            self.receiving.discard(task)
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
