"""When to start connection attempts while a session is resuming. Sans-IO: ``now`` is passed in.

After an outage a resuming session should be back within about one round trip of the link.
One attempt at a time cannot do that: a SYN sent into a dead link is only retried by the
kernel after 1 s, 3 s, 7 s…, and cutting an attempt short to start another loses the one
SYN that may already be on its way. So attempts *overlap*: a new one starts every
``interval`` (about a round trip) while the earlier ones keep their full timeout, at most
``max_parallel`` at once; the first to complete its handshake wins and the others are
dropped. Attempts that fail fast (refused: the peer is up but not listening, e.g. an agent
restarting) are spaced by an exponential backoff instead, so a refusing peer is not
hammered.
"""

from __future__ import annotations

MIN_INTERVAL = 0.25  #: seconds between overlapping attempts, at least
MAX_PARALLEL = 8  #: attempts in progress at once, at most (8 x 0.3 s covers a 2.4 s timeout)
MIN_BACKOFF = 0.05
MAX_BACKOFF = 1.0  #: seconds between attempts that fail fast, at most


def redial_interval(min_rtt: float | None) -> float:
    """Seconds between the starts of overlapping attempts on a path of ``min_rtt``."""
    return max(MIN_INTERVAL, 1.5 * (min_rtt or 0.0))


def attempt_timeout(srtt: float | None, limit: float) -> float:
    """How long one attempt (TCP and TLS handshakes) may take: max(1 s, 3 RTT), at most
    ``limit``. Attempts overlap, so a long one does not delay the next."""
    return min(limit, max(1.0, 3 * (srtt or 0.0)))


class Redial:
    """The attempt schedule of one stream: :meth:`due` says when the next attempt may
    start; :meth:`started`, :meth:`failed` and :meth:`connected` report what happened."""

    def __init__(self, interval: float, now: float, *, max_parallel: int = MAX_PARALLEL) -> None:
        self.interval = interval
        self.max_parallel = max_parallel
        self.pending = 0  #: attempts in progress
        self.backoff = MIN_BACKOFF
        self._next = now  # earliest start of the next attempt

    def due(self, now: float) -> float | None:
        """Seconds until the next attempt may start (0: now), or None while ``max_parallel``
        attempts are in progress (wait for one to end)."""
        if self.pending >= self.max_parallel:
            return None
        return max(0.0, self._next - now)

    def started(self, now: float) -> None:
        self.pending += 1
        self._next = max(self._next, now + self.interval)

    def failed(self, now: float, began: float) -> None:
        """An attempt started at ``began`` failed at ``now``. One that failed within the
        interval (refused, unreachable at once) backs off; one that timed out does not: its
        successors have been running meanwhile."""
        self.pending -= 1
        if now - began < self.interval:
            self._next = max(self._next, now + self.backoff)
            self.backoff = min(self.backoff * 2, MAX_BACKOFF)

    def connected(self) -> None:
        self.pending -= 1
        self.backoff = MIN_BACKOFF
