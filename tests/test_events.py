"""Typed events and the JSON lines they render to (xmig.events)."""

from __future__ import annotations

import dataclasses

import pytest

from xmig.events import BlackoutStep, DestStep, DowntimeBudget, PhaseChanged


def test_an_event_renders_its_kind_and_set_fields_only() -> None:
    assert PhaseChanged(phase="brownout", t=1.5).to_json() == {
        "event": "phase", "phase": "brownout", "t": 1.5}
    assert PhaseChanged(phase="prepare", t=2.0, note="GO sent").to_json()["note"] == "GO sent"
    assert BlackoutStep(step="mirror sealed", disk_seq=7).to_json() == {
        "event": "blackout", "step": "mirror sealed", "disk_seq": 7}
    assert DestStep(step="go", at=12.25).to_json() == {"event": "step", "step": "go",
                                                       "at": 12.25}


def test_the_engine_stamps_a_backends_event_without_changing_it() -> None:
    event = DowntimeBudget(budget_ms=300, qemu_limit_ms=200, reserve_ms=100, fits=True)
    stamped = dataclasses.replace(event, phase="brownout", t=0.25)
    assert event.phase is None and stamped.phase == "brownout"
    assert stamped.to_json() == {"event": "downtime-budget", "phase": "brownout", "t": 0.25,
                                 "budget_ms": 300, "qemu_limit_ms": 200, "reserve_ms": 100,
                                 "fits": True}
    with pytest.raises(dataclasses.FrozenInstanceError):
        stamped.t = 1.0  # type: ignore[misc]
