"""Delivery-rate and round-trip estimates, and the optional rate cap. Sans-IO: ``now`` is passed in.

The memory and storage engines read :class:`DeliveryRate` to size pre-copy rounds, drive
SDPS and bound the mirror queue; :class:`RttEstimator` follows RFC 6298's smoothing and
keeps the minimum (the path's propagation RTT, without queueing).
"""

from __future__ import annotations

from collections import deque


class DeliveryRate:
    """Bytes acknowledged per second over a sliding window of ``window`` seconds."""

    def __init__(self, window: float = 1.0) -> None:
        self.window = window
        self.total = 0
        self._samples: deque[tuple[float, int]] = deque()

    def on_ack(self, nbytes: int, now: float) -> None:
        if not self._samples:
            self._samples.append((now, self.total))
        self.total += nbytes
        self._samples.append((now, self.total))
        self._trim(now)

    def _trim(self, now: float) -> None:
        samples = self._samples
        # keep one sample at or before the window start so the span covers the window
        while len(samples) > 2 and samples[1][0] <= now - self.window:
            samples.popleft()

    def rate(self, now: float) -> float:
        """Bytes per second acknowledged over the last window; 0.0 before two samples."""
        self._trim(now)
        if len(self._samples) < 2:
            return 0.0
        t0, b0 = self._samples[0]
        span = max(now - t0, 1e-3)
        return (self.total - b0) / span


class RttEstimator:
    """Smoothed RTT, its variation and the minimum seen, from probe samples."""

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.min_rtt: float | None = None
        self.latest: float | None = None

    def on_sample(self, rtt: float) -> None:
        self.latest = rtt
        self.min_rtt = rtt if self.min_rtt is None else min(self.min_rtt, rtt)
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt


class TokenBucket:
    """A byte budget refilled at ``rate`` bytes/s, allowed to go into debt by one frame.

    ``allows()`` says whether a frame may go now; ``spend()`` charges it; ``next_ready()`` is
    the time the debt is paid (the timer a driver arms).
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self._stamp = now

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    def allows(self, now: float) -> bool:
        self._refill(now)
        return self.tokens > 0

    def spend(self, nbytes: int, now: float) -> None:
        self._refill(now)
        self.tokens -= nbytes

    def next_ready(self) -> float | None:
        """When the debt is paid (the timer a driver arms), or None if tokens remain."""
        if self.tokens > 0:
            return None
        return self._stamp + (-self.tokens + 1) / self.rate
