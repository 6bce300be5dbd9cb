"""xmig.orchestrator.recovery: what a destination agent's journals say after it restarted (real
journal
files, fsynced; no agent process: tests/test_restart.py kills and restarts a real one)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from xmig.errors import ConfigError, GuestNotFound
from xmig.orchestrator import recovery
from xmig.protocol import control
from xmig.protocol.journal import Journal
from xmig.protocol.switchover import DestPhase
from xmig.service.agentd import _recover

TOKEN = "a" * 32
OWNER = "CN=xmig-client"


def incoming(workdir: Path, name: str, *kinds: str, migration: str = "m1") -> Path:
    """An incoming directory as a killed agent leaves it: a received image, a journal
    holding ``kinds`` (READY with its token and owner)."""
    sdir = workdir / f"incoming-{name}"
    sdir.mkdir(parents=True)
    (sdir / "disk.raw").write_bytes(b"x" * 4096)
    for kind in kinds:
        fields = {"token": TOKEN, "owner": OWNER} if kind == "READY" else {}
        Journal(sdir / "journal").append(kind, migration, 1, **fields)
    return sdir


def test_recover_abandons_in_doubt_discards_half_received_and_keeps_what_ran(
        tmp_path: Path) -> None:
    doubt = incoming(tmp_path, "a", "READY", migration="m1")
    half = incoming(tmp_path, "b", "NEGOTIATED", migration="m2")
    ran = incoming(tmp_path, "c", "READY", "RUNNING", migration="m3")
    bare = incoming(tmp_path, "d", migration="m4")  # killed before its first record

    settled = recovery.recover(tmp_path)

    assert {(h.migration, h.phase) for h in settled} == {
        ("m1", DestPhase.ABANDONED), ("m2", DestPhase.DISCARDED)}
    assert [r.kind for r in Journal(doubt / "journal").records()] == ["READY", "ABANDONED"]
    abandoned = Journal(doubt / "journal").records()[-1]
    assert abandoned.fields["token"] == TOKEN and abandoned.fields["owner"] == OWNER
    assert [p.name for p in doubt.iterdir()] == ["journal"]
    assert [r.kind for r in Journal(half / "journal").records()][-1] == "DISCARDED"
    assert [p.name for p in half.iterdir()] == ["journal"]
    # a guest that ran here keeps its disk: it holds writes acknowledged to it
    assert (ran / "disk.raw").stat().st_size == 4096
    assert not bare.exists()
    assert recovery.recover(tmp_path) == []  # settled once, for good


def test_recover_releases_each_directory_it_gives_up_before_deleting_it(
        tmp_path: Path) -> None:
    doubt = incoming(tmp_path, "a", "READY", migration="m1")
    half = incoming(tmp_path, "b", "NEGOTIATED", migration="m2")
    incoming(tmp_path, "c", "READY", "RUNNING", migration="m3")  # runs here: never released
    bare = incoming(tmp_path, "d", migration="m4")
    released: dict[Path, bool] = {}

    recovery.recover(tmp_path, release=lambda d: released.update({d: (d / "disk.raw").exists()}))

    assert released == {doubt: True, half: True, bare: True}


def test_a_hosted_guests_onward_migrations_are_not_recovered_as_received(
        tmp_path: Path) -> None:
    # arrived (epoch 1), ran here, then this host was the source of epoch 2: cut before GO
    # (the agent died with its guest: the image is the only copy) and of epoch 3 (GO, left)
    sdir = incoming(tmp_path, "a", "READY", "RUNNING", migration="vm1")
    journal = Journal(sdir / "journal")
    journal.append("START", "vm1", 2, token=TOKEN)
    journal.append("ABORT", "vm1", 2, reason="the destination went")
    journal.append("START", "vm1", 3, token=TOKEN)
    before = [r.kind for r in journal.records()]
    (sdir / "guest.ledger").write_bytes(b"l" * 64)

    assert recovery.recover(tmp_path) == []
    assert [(h.epoch, h.phase) for h in recovery.read_dir(sdir)] == [(1, DestPhase.RUNNING)]
    assert [r.kind for r in journal.records()] == before  # nothing journaled for them
    assert sorted(p.name for p in sdir.iterdir()) == ["disk.raw", "guest.ledger", "journal"]


def test_answer_from_journals_checks_token_and_owner(tmp_path: Path) -> None:
    incoming(tmp_path, "a", "READY", migration="m1")
    incoming(tmp_path, "c", "READY", "RUNNING", migration="m3")
    recovery.recover(tmp_path)
    incoming(tmp_path, "d", "READY", migration="m4")  # a live session holds it (no recover)
    held = recovery.scan(tmp_path)

    refused = recovery.answer(held, control.Go("m1", 1, TOKEN), OWNER)
    assert isinstance(refused, control.Refused) and refused.error == "EpochAbandoned"
    assert recovery.answer(held, control.Abort("m1", 1, "x", TOKEN),
                           OWNER) == control.Discarded("m1", 1)
    for decision in (control.Abort("m4", 1, "x", TOKEN), control.Go("m4", 1, TOKEN)):
        busy = recovery.answer(held, decision, OWNER)  # try again once it is given up
        assert isinstance(busy, control.Refused) and busy.error == "GuestStateError", busy
    resumed = recovery.answer(held, control.Go("m3", 1, TOKEN), OWNER)
    assert isinstance(resumed, control.Resumed)
    late = recovery.answer(held, control.Abort("m3", 1, "x", TOKEN), OWNER)
    assert isinstance(late, control.Refused) and late.error == "GuestStateError"
    with pytest.raises(GuestNotFound):
        recovery.answer(held, control.Go("m1", 1, "b" * 32), OWNER)
    with pytest.raises(GuestNotFound):
        recovery.answer(held, control.Go("m1", 1, TOKEN), "CN=someone-else")
    with pytest.raises(GuestNotFound):
        recovery.answer(held, control.Go("m9", 1, TOKEN), OWNER)


def test_one_agent_per_workdir(tmp_path: Path) -> None:
    fd = recovery.lock_workdir(tmp_path)
    try:
        with pytest.raises(ConfigError, match=f"in use by another agent \\(pid {os.getpid()}\\)"):
            recovery.lock_workdir(tmp_path)
    finally:
        os.close(fd)
    os.close(recovery.lock_workdir(tmp_path))  # released with its descriptor


def test_restart_removes_stale_control_sockets_and_keeps_live_ones(tmp_path: Path) -> None:
    stale, live = tmp_path / "gone.ctl", tmp_path / "live.ctl"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(stale))  # its host died: the file stays, nobody listens
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(live))
        listening.listen()
        events: list[dict[str, object]] = []
        _recover(tmp_path, events.append)
        assert not stale.exists()
        assert live.is_socket()
    assert events == []
