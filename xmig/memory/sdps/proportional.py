"""SDPS: throttle just enough that the dirty rate stays under α × the rate left for memory.

The guest's dirty rate is measured under the throttles of the last ``window`` seconds (the
guest's meter averages over about that long), so the controller first estimates the
unthrottled rate — the measured rate ÷ the time-averaged ``1 − throttle`` over that window,
smoothed — then inverts the model ``dirty = base × (1 − throttle)`` for the target::

    throttle = max(0, 1 − α × delivery_rate × memory_share ÷ (wire_ratio × base))

It is zero when the guest already dirties less than the target (no more than needed), falls
as soon as the link gives more or the guest dirties less, and ``release()`` at switchover.
"""

from __future__ import annotations

from collections import deque

from xmig.memory.sdps.base import MAX_THROTTLE, ThrottleController

DEFAULT_ALPHA = 0.7  # chosen by simulation: bench/memory_codec.py --sdps


class ProportionalThrottle(ThrottleController):
    name = "sdps"

    def __init__(self, alpha: float = DEFAULT_ALPHA, *, gain: float = 0.5,
                 window: float = 0.5, max_throttle: float = MAX_THROTTLE) -> None:
        super().__init__(max_throttle=max_throttle)
        if not 0 < alpha < 1:
            raise ValueError("alpha must be within (0, 1)")
        if not 0 < gain <= 1:
            raise ValueError("gain must be within (0, 1]")
        self.alpha = alpha
        self.gain = gain  #: weight of a new sample in the smoothed unthrottled rate
        self.window = window  #: seconds the guest's dirty-rate meter averages over
        self.base: float | None = None  #: smoothed unthrottled dirty rate, bytes/s
        self._history: deque[tuple[float, float]] = deque()  # (since, throttle)

    def _speed(self, now: float) -> float:
        """Time-averaged ``1 − throttle`` over the last ``window`` seconds."""
        start = now - self.window
        hist = self._history
        while len(hist) > 1 and hist[1][0] <= start:
            hist.popleft()
        if not hist or self.window <= 0:
            return 1.0 - self.throttle
        total = 0.0
        for k, (since, th) in enumerate(hist):
            until = hist[k + 1][0] if k + 1 < len(hist) else now
            total += (until - max(since, start)) * (1.0 - th)
        span = now - max(hist[0][0], start)
        return total / span if span > 0 else 1.0 - hist[-1][1]

    def update(self, *, now: float, delivery_rate: float, dirty_rate: float,
               memory_share: float = 1.0, wire_ratio: float = 1.0) -> float:
        if not self._history:
            self._history.append((now - self.window, self.throttle))
        sample = dirty_rate / max(self._speed(now), 1.0 - self.max_throttle)
        self.base = sample if self.base is None else (
            self.base + self.gain * (sample - self.base))
        target = self.alpha * max(delivery_rate, 0.0) * memory_share
        demand = self.base * max(wire_ratio, 1e-3)
        new = 0.0 if demand <= target else 1.0 - target / demand
        if not self._history or new != self._history[-1][1]:
            self._history.append((now, min(max(new, 0.0), self.max_throttle)))
        return self._set(new)

    def release(self) -> float:
        self.base = None
        self._history.clear()
        return super().release()
