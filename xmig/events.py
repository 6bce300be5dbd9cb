"""What a migration reports as it goes: typed events. The engine and the backends emit them;
the daemons, the harnesses and the CLI render them (:meth:`Event.to_json` is the JSON line
they print or stream, ``{"event": KIND, ...}``, with unset fields left out).

    Event                   phase (the machine's, stamped by the engine), t (s since start)
    ├── PhaseChanged        "phase": a new phase, or a note in one (note, error)
    ├── ProgressNote        "progress_note": a remark on the brownout
    ├── SimProgress         "progress": the reference guest's pre-copy round and disk copy
    ├── QemuProgress        "progress": QEMU's stream and its max-bandwidth
    ├── DowntimeBudget      "downtime-budget": how --max-downtime is split (QEMU)
    ├── BlackoutStep        "blackout": one step from the pause to GO
    └── DestStep            "step": one step of the destination, at its monotonic clock
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True, kw_only=True)
class Event:
    """Something that happened in one migration."""

    kind: ClassVar[str] = "event"
    phase: str | None = None  #: the engine's phase when it happened
    t: float | None = None  #: seconds since the migration began (the source's)

    def to_json(self) -> dict[str, Any]:
        """The JSON line: ``event`` is the kind; fields that are None are left out."""
        out: dict[str, Any] = {"event": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out


@dataclass(frozen=True, kw_only=True)
class PhaseChanged(Event):
    kind: ClassVar[str] = "phase"
    note: str | None = None
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class ProgressNote(Event):
    kind: ClassVar[str] = "progress_note"
    note: str


@dataclass(frozen=True, kw_only=True)
class SimProgress(Event):
    """A pre-copy round of the page engine and the disk copy's figures."""

    kind: ClassVar[str] = "progress"
    round: int
    pages_left: int
    predicted_downtime_ms: float
    decision: str  #: the planner's: continue, switchover, ...
    throttle: float
    dirty_rate_Bps: float
    memory_rate_Bps: float
    wire_ratio: float
    disk: dict[str, Any] | None  #: :class:`~xmig.storage.engine.DiskProgress` as a dict
    session: dict[str, Any]  #: the transport session's counters


@dataclass(frozen=True, kw_only=True)
class QemuProgress(Event):
    """QEMU's stream through the tunnel and the max-bandwidth it was given."""

    kind: ClassVar[str] = "progress"
    stream: dict[str, Any]
    max_bandwidth: float | None  #: B/s; None: not set yet
    session: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class DowntimeBudget(Event):
    kind: ClassVar[str] = "downtime-budget"
    budget_ms: float
    qemu_limit_ms: float
    reserve_ms: float
    fits: bool


@dataclass(frozen=True, kw_only=True)
class BlackoutStep(Event):
    kind: ClassVar[str] = "blackout"
    step: str
    pages: int | None = None
    disk_seq: int | None = None
    repaired_chunks: int | None = None


@dataclass(frozen=True, kw_only=True)
class DestStep(Event):
    kind: ClassVar[str] = "step"
    step: str
    at: float  #: the destination's monotonic clock
    stale: int | None = None  #: RAM chunks found stale (QEMU)
