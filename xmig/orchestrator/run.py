"""The one engine run on each backend: what the daemons, the harnesses and the tests call.

- :func:`migrate` / :func:`receive_migration` — the reference guest's source and destination
  (:class:`~xmig.guest.sim.source.SimSource`, :class:`~xmig.guest.sim.dest.SimDest`);
- :func:`migrate_qemu` / :func:`receive_qemu` — a QEMU guest's
  (:class:`~xmig.guest.qemu.migrate.QemuSource`, :class:`~xmig.guest.qemu.receive.QemuDest`).

Each builds the backend and runs :func:`~xmig.orchestrator.source.run_source` or
:func:`~xmig.orchestrator.destination.run_destination` with it: the protocol, the commit and
the abort are the same for every guest.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from xmig.events import Event
from xmig.guest.qemu.machine import PopenFn, QemuConfig, QemuGuest
from xmig.guest.qemu.migrate import QemuMigrationOptions, QemuSource, QemuSourceResult
from xmig.guest.qemu.receive import QemuDest, QemuDestResult
from xmig.guest.qemu.stream import CHUNK
from xmig.guest.sim import SimGuest
from xmig.guest.sim.dest import SimDest, SimDestResult
from xmig.guest.sim.source import MigrationOptions, SimSource, SimSourceResult
from xmig.hostpolicy import DEFAULT_POLICY, HostPolicy
from xmig.orchestrator.destination import run_destination
from xmig.orchestrator.source import run_source
from xmig.protocol import control
from xmig.protocol.journal import Journal
from xmig.storage.nbd import NbdServer
from xmig.storage.raw import RawFileBackend
from xmig.transport import TransportSession


async def migrate(
    session: TransportSession,
    guest: SimGuest,
    disk: RawFileBackend,
    nbd: NbdServer,
    *,
    migration: str,
    journal: Journal,
    options: MigrationOptions,
    on_progress: Callable[[Event], None] = lambda event: None,
) -> SimSourceResult:
    """Move ``guest`` (its RAM, and its disk served to it by ``nbd`` from ``disk``) to the
    destination agent at the other end of ``session`` (:func:`run_source`)."""
    backend = SimSource(guest, disk, nbd, options)
    await run_source(session, backend, migration=migration, journal=journal,
                     reply_timeout_s=options.reply_timeout_s,
                     blackout_timeout_s=options.blackout_timeout_s, on_progress=on_progress)
    return backend.result


async def receive_migration(
    session: TransportSession,
    *,
    workdir: Path,
    journal: Journal,
    reply_timeout_s: float = 300.0,
    on_event: Callable[[Event], None] = lambda event: None,
    first: control.Negotiate | None = None,
    policy: HostPolicy = DEFAULT_POLICY,
) -> SimDestResult:
    """Serve one migration arriving on ``session`` (``first``: its NEGOTIATE, if the caller
    read it already, see :func:`first_message`) into ``workdir`` (this host's choice; every
    file in it is named here), by the one engine
    (:func:`~xmig.orchestrator.destination.run_destination`). On success the guest runs
    here and the result holds it (with its image and NBD server: the caller owns them from
    then on); READY and cut off from the source is :class:`~xmig.errors.InDoubt`."""
    backend = SimDest(workdir=workdir, reply_timeout_s=reply_timeout_s, policy=policy)
    await run_destination(session, backend, journal=journal, reply_timeout_s=reply_timeout_s,
                          on_event=on_event, first=first)
    return backend.result


async def migrate_qemu(
    session: TransportSession,
    source: QemuGuest,
    *,
    migration: str,
    journal: Journal,
    workdir: Path,
    options: QemuMigrationOptions | None = None,
    on_progress: Callable[[Event], None] = lambda event: None,
) -> QemuSourceResult:
    """Move the running QEMU ``source`` to the destination agent at the other end of
    ``session`` (:func:`~xmig.orchestrator.source.run_source`). Raises MigrationAborted
    (the source guest runs) on any failure before GO; a result IN_DOUBT when GO was
    journaled and the destination did not confirm (the caller settles it)."""
    options = options or QemuMigrationOptions()
    backend = QemuSource(source, workdir, options)
    await run_source(session, backend, migration=migration, journal=journal,
                     reply_timeout_s=options.reply_timeout_s,
                     blackout_timeout_s=options.blackout_timeout_s, on_progress=on_progress)
    return backend.result


async def receive_qemu(
    session: TransportSession,
    template: QemuConfig,
    *,
    workdir: Path,
    journal: Journal,
    reply_timeout_s: float = 300.0,
    popen: PopenFn | None = None,
    launch: Callable[[QemuConfig], Awaitable[QemuGuest]] | None = None,
    chunk: int = CHUNK,
    on_event: Callable[[Event], None] = lambda event: None,
    first: control.Negotiate | None = None,
    policy: HostPolicy = DEFAULT_POLICY,
) -> QemuDestResult:
    """Serve one QEMU migration arriving on ``session`` by the one engine
    (:func:`~xmig.orchestrator.destination.run_destination`): start the destination QEMU
    from ``template`` (:func:`incoming_config`), feed it the stream, vote READY when it has
    loaded everything, run it on GO. The result holds the running guest (the caller owns
    it). Before READY a failure discards the destination; READY and then cut off from the
    source: InDoubt (the guest stays paused). Every file is named here, in ``workdir``
    (this host's choice); the source's words are labels."""
    backend = QemuDest(template, workdir=workdir, reply_timeout_s=reply_timeout_s,
                       popen=popen, launch=launch, chunk=chunk, policy=policy,
                       on_event=on_event)
    await run_destination(session, backend, journal=journal, reply_timeout_s=reply_timeout_s,
                          on_event=on_event, first=first)
    return backend.result
