"""What a destination agent knows of the migrations it received: their journals.

Each arriving guest gets its own directory ``DIR/incoming-<hex>/`` with its own journal
(:mod:`xmig.service.agentd`). The journals are the agent's memory across a restart (``kill -9``,
a power loss):

- READY journaled (with the migration's token and the certificate identity that started it)
  and nothing after it: the migration was *in doubt* here. After a restart its paused guest
  is gone (it lived in the agent's child processes), so :func:`recover` journals ABANDONED
  and deletes what was received, keeping the journal. A source settling that epoch is told
  so (:class:`~xmig.errors.EpochAbandoned`) and resumes its own paused copy: this agent
  refuses GO for an abandoned epoch for ever, so only one side can ever run it.
- RUNNING: the guest ran here. A source settling that epoch with GO is told RESUMED (its GO
  arrived), never that it may resume.
- Neither (cut off mid-receive): DISCARDED is journaled and the files are deleted.
- No journal at all (the agent died between NEGOTIATE and READY, before anything was
  journaled): nothing was promised, the directory is deleted.

Only one agent at a time may use a work directory (:func:`lock_workdir`): what it finds
there at its start was left by an earlier run, never by a live neighbour.

A destination never decides alone: nothing here runs a guest or tells a source to resume
before ABANDONED is durable.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from xmig.errors import ConfigError, GuestNotFound
from xmig.protocol import control
from xmig.protocol.journal import Journal
from xmig.protocol.switchover import DestMachine, DestPhase

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal"
#: the destination's records, by the phase they leave a migration in
_PHASES = {"READY": DestPhase.IN_DOUBT, "RUNNING": DestPhase.RUNNING,
           "DISCARDED": DestPhase.DISCARDED, "ABANDONED": DestPhase.ABANDONED}


@dataclass(frozen=True)
class Received:
    """One migration a directory's journal holds."""

    dir: Path
    migration: str
    epoch: int
    phase: DestPhase | None  #: None: received in part, never READY, not cleaned up
    token: str = ""  #: from READY (empty before it)
    owner: str = ""  #: the certificate identity that started it (from READY)


def scan(workdir: Path) -> list[Received]:
    """Every migration the ``incoming-*`` journals under ``workdir`` hold."""
    return [held for sdir in sorted(workdir.glob("incoming-*")) for held in read_dir(sdir)]


def read_dir(sdir: Path) -> list[Received]:
    """The migrations the journal in ``sdir`` received (an unreadable journal is logged and
    skipped: it decides nothing). The epochs of a hosted guest's onward migrations, also
    journaled there (from START), are not among them: recovering one as "cut off mid-receive"
    deleted the ledger and logs of a guest that had left, and would delete the only image
    of one whose agent died while it was the source."""
    path = sdir / JOURNAL_NAME
    if not path.is_file():
        return []
    try:
        records = Journal(path).records()
    except ConfigError as err:
        log.warning("%s: skipped: %s", path, err)
        return []
    # a guest hosted here journals its onward migrations (START, GO, ABORT, ...) in the same
    # file: those epochs are this host's as a source, never received here
    sent = {(rec.migration, rec.epoch) for rec in records if rec.kind == "START"}
    migrations: dict[tuple[str, int], Received] = {}
    for rec in records:
        key = (rec.migration, rec.epoch)
        if key in sent:
            continue
        held = migrations.get(key) or Received(sdir, rec.migration, rec.epoch, None)
        phase = _PHASES.get(rec.kind, held.phase)
        if rec.kind == "READY":
            held = Received(sdir, rec.migration, rec.epoch, phase,
                            str(rec.fields.get("token", "")), str(rec.fields.get("owner", "")))
        else:
            held = Received(sdir, rec.migration, rec.epoch, phase, held.token, held.owner)
        migrations[key] = held
    return list(migrations.values())


def lock_workdir(workdir: Path) -> int:
    """Take ``workdir`` for this process (an exclusive ``flock`` on ``DIR/agent.lock``, held
    until the returned descriptor is closed or the process ends, however it ends).
    ConfigError if another live agent holds it."""
    path = workdir / "agent.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as err:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(f"workdir {workdir} is in use by another agent (pid {holder})") \
            from err
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def recover(workdir: Path, *,
            release: Callable[[Path], object] = lambda sdir: None) -> list[Received]:
    """At an agent's start, ``workdir`` locked (nothing of an earlier process is held):
    abandon every migration left in doubt, journaled first, and discard every one cut off
    mid-receive; delete what either received (the journal stays), and every incoming
    directory without a journal. ``release(dir)`` runs before a directory's files are
    deleted: it stops what an earlier process left running there (a backend's processes,
    e.g. :func:`xmig.guest.qemu.leftover.reap`). Returns the migrations abandoned or
    discarded now."""
    for sdir in sorted(workdir.glob("incoming-*")):
        if sdir.is_dir() and not sdir.is_symlink() and not (sdir / JOURNAL_NAME).exists():
            log.info("%s: no journal: deleted", sdir)
            release(sdir)
            shutil.rmtree(sdir, ignore_errors=True)
    settled: list[Received] = []
    for held in scan(workdir):
        journal = Journal(held.dir / JOURNAL_NAME)
        if held.phase is DestPhase.IN_DOUBT:
            step = DestMachine.in_doubt(held.epoch).abandon()
            journal.append("ABANDONED", held.migration, held.epoch, token=held.token,
                           owner=held.owner, reason="the agent restarted without the paused "
                           "guest")
            assert step.phase is DestPhase.ABANDONED
            settled.append(Received(held.dir, held.migration, held.epoch,
                                    DestPhase.ABANDONED, held.token, held.owner))
        elif held.phase is None:
            journal.append("DISCARDED", held.migration, held.epoch,
                           reason="the agent restarted while it arrived")
            settled.append(Received(held.dir, held.migration, held.epoch,
                                    DestPhase.DISCARDED, held.token, held.owner))
        else:
            continue
        release(held.dir)
        _delete_all_but_journal(held.dir)
    return settled


def _delete_all_but_journal(sdir: Path) -> None:
    for entry in sdir.iterdir():
        if entry.name == JOURNAL_NAME:
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def answer(received: Iterable[Received], decision: control.Go | control.Abort,
           peer_key: str) -> control.Message | None:
    """What this agent's journals (:func:`scan`) say to a source settling a migration no
    process here holds: RESUMED for GO to an epoch that ran here; EpochAbandoned (REFUSED)
    for GO to one abandoned or discarded; DISCARDED for ABORT to one discarded or
    abandoned; GuestStateError (REFUSED: try again) for one READY whose receiving session
    has not given it up yet.
    Only for the migration's token and the identity that started it; for anything else,
    or a migration not known here, GuestNotFound (the caller refuses it, typed)."""
    for held in received:
        if (held.migration, held.epoch) != (decision.migration, decision.epoch):
            continue
        if not held.token or not control.token_matches(decision.token, held.token) or (
                peer_key != held.owner):
            break
        if held.phase is DestPhase.RUNNING:
            if isinstance(decision, control.Go):
                return control.Resumed(held.migration, held.epoch, 0.0)
            return control.Refused(held.migration, "GuestStateError",
                                   f"migration {held.migration} epoch {held.epoch} runs "
                                   "here: too late to abort")
        if held.phase in (DestPhase.ABANDONED, DestPhase.DISCARDED):
            if isinstance(decision, control.Go):
                return control.Refused(held.migration, "EpochAbandoned",
                                       f"migration {held.migration} epoch {held.epoch} was "
                                       f"{held.phase.value} here and never runs here: the "
                                       "source's copy is the only one")
            return control.Discarded(held.migration, held.epoch)
        if held.phase is DestPhase.IN_DOUBT:  # READY: its receiving session still holds it
            return control.Refused(held.migration, "GuestStateError",
                                   f"migration {held.migration} epoch {held.epoch} is still "
                                   "held by the session that received it: try again")
        break
    raise GuestNotFound(f"no migration {decision.migration} epoch {decision.epoch} is in "
                        "doubt or settled here")
