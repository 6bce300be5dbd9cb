"""The SDPS controller interface. Sans-IO, pluggable like a congestion controller.

The engine calls :meth:`ThrottleController.update` every interval with what it measured,
:meth:`ThrottleController.on_round` at every pre-copy round, and
:meth:`ThrottleController.release` at switchover or abort; it hands each returned
fraction to :meth:`~xmig.memory.guest.SourceMemory.set_throttle`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

MAX_THROTTLE = 0.99


class ThrottleController(ABC):
    """Decides the vCPU throttle (0.0 = full speed … ``max_throttle``, by default
    ``MAX_THROTTLE``: a backend that can slow its vCPUs further says so)."""

    name = "base"
    #: updated every interval from the start, not only once the planner engages SDPS (a
    #: controller that decides by itself when to slow the guest, e.g. the convergence one)
    always_updated = False

    def __init__(self, *, max_throttle: float = MAX_THROTTLE) -> None:
        if not 0 < max_throttle < 1:
            raise ValueError("max_throttle must be within (0, 1)")
        self.max_throttle = max_throttle
        self.throttle = 0.0
        self.max_seen = 0.0
        self.engaged_because = ""

    def _set(self, value: float) -> float:
        self.throttle = min(max(value, 0.0), self.max_throttle)
        self.max_seen = max(self.max_seen, self.throttle)
        return self.throttle

    @abstractmethod
    def update(self, *, now: float, delivery_rate: float, dirty_rate: float,
               memory_share: float = 1.0, wire_ratio: float = 1.0) -> float:
        """The throttle for the next interval. ``delivery_rate`` is the link's bytes/s,
        ``memory_share`` the fraction of it memory may use, ``dirty_rate`` the guest's
        bytes/s measured under the current throttle, ``wire_ratio`` the codec's wire bytes
        per page byte."""

    def on_round(self, *, now: float, dirty_bytes: int, sent_bytes: int) -> float:
        """A pre-copy round ended: ``dirty_bytes`` were dirtied while ``sent_bytes`` (raw)
        were sent. Rate-based controllers ignore it."""
        return self.throttle

    def engage(self, reason: str) -> None:
        """The planner engages SDPS (``reason``: why); from now on :meth:`update` is
        called every interval. Controllers that decide by themselves note it."""
        self.engaged_because = reason

    def release(self) -> float:
        """Full speed again (switchover, abort)."""
        self.throttle = 0.0
        return 0.0
