"""QEMU's auto-converge, the baseline SDPS has to beat.

At each dirty-bitmap sync QEMU compares the bytes dirtied since the previous sync with the
bytes it transferred; when they exceed ``threshold`` (50 %) of them twice, it throttles the
vCPUs: ``initial`` (20 %) the first time, ``increment`` (10 %) more each time after, up to
99 %. It never looks at the link's rate, and never lowers the throttle before the end.
"""

from __future__ import annotations

from xmig.memory.sdps.base import ThrottleController


class AutoConverge(ThrottleController):
    name = "auto-converge"

    def __init__(self, *, initial: float = 0.2, increment: float = 0.1,
                 threshold: float = 0.5, trigger: int = 2) -> None:
        super().__init__()
        self.initial = initial
        self.increment = increment
        self.threshold = threshold
        self.trigger = trigger
        self._high = 0

    def update(self, *, now: float, delivery_rate: float, dirty_rate: float,
               memory_share: float = 1.0, wire_ratio: float = 1.0) -> float:
        return self.throttle

    def on_round(self, *, now: float, dirty_bytes: int, sent_bytes: int) -> float:
        if dirty_bytes > self.threshold * sent_bytes:
            self._high += 1
            if self._high >= self.trigger:
                self._high = 0
                step = self.initial if self.throttle == 0 else self.throttle + self.increment
                return self._set(round(step, 6))
        return self.throttle

    def release(self) -> float:
        self._high = 0
        return super().release()
