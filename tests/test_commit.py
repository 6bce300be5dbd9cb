"""The commit protocol executed (xmig.protocol.commit): every backend's orchestrator performs a
state machine's step through execute(), so the order proved here is the order on every
backend: the decision journaled before it is said or acted on, nothing after a record that
could not be written."""

from __future__ import annotations

from dataclasses import replace

import pytest

from xmig.errors import StateError
from xmig.protocol.commit import Effects, execute
from xmig.protocol.switchover import DestMachine, SourceMachine, SourcePhase


class Recorder:
    """Effects that record what was done, in order; ``fail_journal`` makes the record
    unwritable (a full or dead disk)."""

    def __init__(self, *, fail_journal: bool = False) -> None:
        self.done: list[str] = []
        self.fail_journal = fail_journal

    def journal(self, kind: str) -> None:
        if self.fail_journal:
            raise OSError(28, "No space left on device")
        self.done.append(f"journal {kind}")

    def effect(self, name: str) -> object:
        async def run() -> None:
            self.done.append(name)
        return run

    def effects(self) -> Effects:
        names = ("pause_guest", "resume_guest", "release_throttle", "stop_mirror",
                 "stop_transfer", "send_ready", "send_go", "send_abort", "discard",
                 "discard_source")
        return Effects(journal=self.journal, **{n: self.effect(n) for n in names})  # type: ignore[arg-type]


def source_in(phase: SourcePhase) -> SourceMachine:
    machine = SourceMachine(epoch=4)
    for event in ("negotiated", "pause", "final_sent")[:[
            SourcePhase.NEGOTIATE, SourcePhase.BROWNOUT, SourcePhase.BLACKOUT,
            SourcePhase.PREPARE].index(phase)]:
        getattr(machine, event)()
    return machine


async def test_go_is_journaled_before_it_is_sent() -> None:
    rec = Recorder()
    step = await execute(source_in(SourcePhase.PREPARE).ready(4), rec.effects())
    assert step.phase is SourcePhase.COMMITTED
    assert rec.done == ["journal GO", "send_go"]


async def test_go_that_cannot_be_journaled_is_never_sent() -> None:
    rec = Recorder(fail_journal=True)
    with pytest.raises(OSError):
        await execute(source_in(SourcePhase.PREPARE).ready(4), rec.effects())
    assert rec.done == []


@pytest.mark.parametrize(("phase", "resumes"), [
    (SourcePhase.NEGOTIATE, False), (SourcePhase.BROWNOUT, False),
    (SourcePhase.BLACKOUT, True), (SourcePhase.PREPARE, True)])
async def test_an_abort_is_journaled_then_released_then_the_guest_runs_then_told(
        phase: SourcePhase, resumes: bool) -> None:
    rec = Recorder()
    await execute(source_in(phase).abort("link gone"), rec.effects())
    expected = ["journal ABORT", "release_throttle", "stop_mirror", "stop_transfer",
                *(["resume_guest"] if resumes else []), "send_abort"]
    assert rec.done == expected


async def test_the_destination_journals_ready_before_it_votes_and_running_before_it_runs(
        ) -> None:
    rec = Recorder()
    dst = DestMachine(epoch=4)
    dst.prepared()
    await execute(dst.final_applied(), rec.effects())
    await execute(dst.go(4), rec.effects())
    assert rec.done == ["journal READY", "send_ready", "journal RUNNING", "resume_guest"]
    other = DestMachine(epoch=5)
    other.prepared()
    await execute(other.abort("source gone"), rec.effects())
    assert rec.done[-2:] == ["journal DISCARDED", "discard"]


async def test_a_missing_effect_fails_before_anything_is_done() -> None:
    rec = Recorder()
    machine = source_in(SourcePhase.PREPARE)
    with pytest.raises(StateError, match="no effect for send_go"):
        await execute(machine.ready(4), replace(rec.effects(), send_go=None))
    with pytest.raises(StateError, match="no effect for journal"):
        await execute(source_in(SourcePhase.PREPARE).ready(4),
                      replace(rec.effects(), journal=None))
    assert rec.done == []
