"""The commit protocol's state machines and the journal, without I/O."""

from __future__ import annotations

from pathlib import Path

import pytest

from xmig.errors import ConfigError, StateError
from xmig.protocol.journal import Journal
from xmig.protocol.switchover import Action, DestMachine, DestPhase, SourceMachine, SourcePhase


def test_happy_path_actions_in_order() -> None:
    src, dst = SourceMachine(epoch=7), DestMachine(epoch=7)
    src.negotiated()
    dst.prepared()
    step = src.pause()
    assert step.actions == (Action.RELEASE_THROTTLE, Action.PAUSE_GUEST)
    src.final_sent()
    ready = dst.final_applied()
    assert ready.actions == (Action.JOURNAL, Action.SEND_READY) and ready.journal == "READY"
    go = src.ready(7)
    assert go.actions == (Action.JOURNAL, Action.SEND_GO)  # journal strictly before GO
    assert not src.may_resume_source
    run = dst.go(7)
    assert run.actions == (Action.JOURNAL, Action.RESUME_GUEST)
    assert src.resumed().phase is SourcePhase.DONE
    assert dst.phase is DestPhase.RUNNING


@pytest.mark.parametrize("stop_after", [0, 1, 2, 3])
def test_abort_before_go_resumes_the_source_only_if_paused(stop_after: int) -> None:
    src = SourceMachine(epoch=1)
    for i, ev in enumerate((src.negotiated, src.pause, src.final_sent)):
        if i >= stop_after:
            break
        ev()
    step = src.abort("link gone")
    assert step.phase is SourcePhase.ABORTED
    assert (Action.RESUME_GUEST in step.actions) == (stop_after >= 2)
    assert step.actions[0] is Action.JOURNAL and step.actions[-1] is Action.SEND_ABORT
    assert src.may_resume_source


def test_no_abort_after_go_and_no_resume_twice() -> None:
    src = SourceMachine(epoch=1)
    src.negotiated()
    src.pause()
    src.final_sent()
    src.ready(1)
    with pytest.raises(StateError):
        src.abort("too late")
    dst = DestMachine(epoch=1)
    dst.prepared()
    dst.final_applied()
    dst.go(1)
    with pytest.raises(StateError):
        dst.abort("too late")
    with pytest.raises(StateError):
        dst.go(1)


def test_wrong_epoch_is_refused_and_failure_is_sticky() -> None:
    src = SourceMachine(epoch=3)
    src.negotiated()
    src.pause()
    src.final_sent()
    with pytest.raises(StateError):
        src.ready(2)
    assert src.phase is SourcePhase.PREPARE
    src.fail("destination disk full")
    assert src.phase is SourcePhase.FAILED
    with pytest.raises(StateError, match="disk full"):
        src.abort("again")


def test_fencing_refuses_older_epochs() -> None:
    dst = DestMachine(epoch=5)
    dst.prepared()
    assert dst.accepts_write(5)
    assert not dst.accepts_write(4)
    dst.final_applied()
    assert not dst.accepts_write(5)  # nothing is written once READY is voted


def test_journal_is_durable_and_ignores_a_torn_tail(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j" / "journal")
    j.append("START", "m1", 1)
    j.append("GO", "m1", 1, reason="fits")
    with open(j.path, "a") as f:
        f.write('{"kind": "ABO')  # a crash in the middle of a write
    last = Journal(j.path).last("m1")
    assert last is not None
    assert (last.kind, last.epoch, last.fields) == ("GO", 1, {"reason": "fits"})
    assert j.next_epoch() == 2


def test_a_torn_tail_is_dropped_before_the_next_record_so_the_journal_stays_readable(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    j = Journal(tmp_path / "journal")
    j.append("START", "m1", 1)
    with open(j.path, "a") as f:
        f.write('{"kind": "READY", "migr')  # power lost mid-write
    j.append("ABORT", "m1", 1, reason="restarted")  # the next run goes on writing
    assert [r.kind for r in j.records()] == ["START", "ABORT"]
    assert j.next_epoch() == 2
    assert "torn" in caplog.text
    assert j.path.read_text().count("\n") == 2


def test_journal_with_a_bad_middle_record_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    path.write_text('{"kind": "GO", "migration": "m", "epoch": 1, "at": 0}\nnot json\n{}\n')
    with pytest.raises(ConfigError):
        Journal(path).records()
