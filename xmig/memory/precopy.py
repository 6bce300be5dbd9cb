"""The pre-copy planner: predict the downtime of stopping now, and decide. Sans-IO.

Round 0 sends every non-zero page; round n the pages the dirty log returned. After each
fetch the engine hands the planner its figures; the planner predicts the downtime of
pausing the guest now (DESIGN.md, "Predict, then stop")::

    downtime ≈ (remaining dirty bytes × wire ratio + memory backlog + device state
                + mirror queue) ÷ delivery rate + commit round trips × RTT

(the backlog is what was sent but is not yet delivered: it is already wire bytes and the
final round queues behind it), and decides:

- SWITCHOVER when the prediction fits the budget;
- NOT_CONVERGING once the pre-copy has run past its timeout (the orchestrator aborts, the
  source keeps running: never pause indefinitely), or at once when the commit round trips
  alone exceed the budget (no amount of pre-copy can fit it);
- ENGAGE_SDPS, once, when it does not fit and the rounds stopped shrinking (or cannot
  shrink: after round 0, the guest dirties faster than the link drains, in wire bytes);
- CONTINUE otherwise.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field


class Decision(enum.Enum):
    CONTINUE = "continue"
    SWITCHOVER = "switchover"
    ENGAGE_SDPS = "engage_sdps"
    NOT_CONVERGING = "not_converging"


@dataclass(frozen=True)
class PlannerConfig:
    downtime_budget: float = 0.3  #: seconds the guest may be paused
    timeout: float = 600.0  #: seconds of pre-copy before giving up
    commit_rtts: float = 1.5  #: WAN round trips between pause and resume (final → ready → GO)
    stall_rounds: int = 2  #: rounds that fail to shrink before the rounds count as stalled
    shrink: float = 0.9  #: a round shrinks if it is below this × the best round before it
    sdps: bool = True  #: whether ENGAGE_SDPS may be decided

    def __post_init__(self) -> None:
        if self.downtime_budget <= 0 or self.timeout <= 0:
            raise ValueError("downtime budget and timeout must be positive")
        if self.stall_rounds < 1 or not 0 < self.shrink <= 1:
            raise ValueError("stall_rounds ≥ 1 and 0 < shrink ≤ 1")


@dataclass(frozen=True)
class Figures:
    """What the engine measured when it asks the planner."""

    remaining_bytes: int  #: dirty bytes not yet sent (pages × PAGE_SIZE)
    delivery_rate: float  #: bytes/s the link gives memory
    wire_ratio: float = 1.0  #: wire bytes per raw page byte, as the codec achieves lately
    backlog_bytes: int = 0  #: memory wire bytes sent and not yet delivered
    device_state_bytes: int = 0
    mirror_queue_bytes: int = 0  #: disk writes queued for the destination (orchestrator)
    rtt: float = 0.0  #: seconds, smoothed (queueing included)
    base_rtt: float = 0.0  #: seconds, the least seen (the path's propagation delay)
    dirty_rate: float = 0.0  #: bytes/s the guest dirties (for the engage decision)


def predict_downtime(f: Figures, *, commit_rtts: float = 1.5) -> float:
    """Seconds the guest would be paused if it were paused now (``inf`` with no rate)."""
    wire = (f.remaining_bytes * f.wire_ratio + f.backlog_bytes + f.device_state_bytes
            + f.mirror_queue_bytes)
    if wire <= 0:
        transfer = 0.0
    elif f.delivery_rate <= 0:
        return math.inf
    else:
        transfer = wire / f.delivery_rate
    return transfer + commit_rtts * f.rtt


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    predicted_downtime: float
    round: int
    reason: str = ""


@dataclass
class PrecopyPlanner:
    """Decides after each fetch; keeps the round sizes to see when they stop shrinking."""

    config: PlannerConfig
    start: float  #: when the pre-copy began (``now`` of the first call)
    rounds: list[int] = field(default_factory=list)  #: dirty bytes fetched per round
    sdps_engaged: bool = False

    @property
    def round(self) -> int:
        """The current round (0 = the first full pass); -1 before any."""
        return len(self.rounds) - 1

    def on_round(self, dirty_bytes: int) -> None:
        """A new round began with ``dirty_bytes`` to send."""
        self.rounds.append(dirty_bytes)

    def stalled(self) -> bool:
        """None of the last ``stall_rounds`` rounds went below ``shrink`` × the best round
        before them."""
        k = self.config.stall_rounds
        if len(self.rounds) <= k:
            return False
        best = min(self.rounds[:-k])
        return all(r >= self.config.shrink * best for r in self.rounds[-k:])

    def decide(self, *, now: float, figures: Figures) -> Verdict:
        cfg = self.config
        predicted = predict_downtime(figures, commit_rtts=cfg.commit_rtts)
        # queueing inflates the smoothed RTT while pre-copy fills the link; the commit's
        # messages cross an emptied link, so the floor is set by the least RTT seen
        floor = cfg.commit_rtts * (figures.base_rtt or figures.rtt)
        if floor >= cfg.downtime_budget:
            return Verdict(Decision.NOT_CONVERGING, predicted, self.round,
                           f"the downtime budget {cfg.downtime_budget * 1e3:.0f} ms is under "
                           f"this link's commit floor {cfg.commit_rtts:g} × RTT = "
                           f"{floor * 1e3:.0f} ms: no pre-copy can fit it")
        if predicted <= cfg.downtime_budget:
            return Verdict(Decision.SWITCHOVER, predicted, self.round,
                           f"predicted {predicted * 1e3:.0f} ms fits the budget")
        if now - self.start >= cfg.timeout:
            return Verdict(Decision.NOT_CONVERGING, predicted, self.round,
                           f"predicted {predicted * 1e3:.0f} ms after {now - self.start:.1f} s "
                           f"(timeout {cfg.timeout:.0f} s, budget "
                           f"{cfg.downtime_budget * 1e3:.0f} ms)")
        if cfg.sdps and not self.sdps_engaged:
            why = ""
            if self.stalled():
                why = f"rounds stopped shrinking: {self.rounds[-1 - cfg.stall_rounds:]}"
            elif (self.round >= 1 and figures.delivery_rate > 0
                  and figures.dirty_rate * figures.wire_ratio >= figures.delivery_rate):
                why = (f"dirty rate {figures.dirty_rate / 1e6:.1f} MB/s × wire ratio "
                       f"{figures.wire_ratio:.2f} ≥ delivery rate "
                       f"{figures.delivery_rate / 1e6:.1f} MB/s")
            if why:
                self.sdps_engaged = True
                return Verdict(Decision.ENGAGE_SDPS, predicted, self.round, why)
        return Verdict(Decision.CONTINUE, predicted, self.round)


class BusyRate:
    """The rate the link gives memory: bytes delivered ÷ time, counting only intervals in
    which the sender kept a backlog (an idle sender's rate says nothing about the link),
    over the last ``window`` seconds of such time. ``None`` until ``min_busy`` seconds
    were seen (the first burst — socket buffers, a token bucket — overstates the link)."""

    def __init__(self, window: float = 2.0, min_busy: float = 0.5) -> None:
        self.window = window
        self.min_busy = min_busy
        self._seen = 0.0
        self._spans: deque[tuple[float, int]] = deque()  # (seconds, bytes) while busy
        self._time = 0.0
        self._bytes = 0
        self._last: tuple[float, int, bool] | None = None

    def update(self, *, now: float, delivered: int, busy: bool) -> float | None:
        """``delivered``: bytes delivered so far (a running total); ``busy``: whether the
        sender has a backlog now."""
        last = self._last
        if last is not None and last[2] and busy and now > last[0]:
            span = (now - last[0], delivered - last[1])
            self._spans.append(span)
            self._time += span[0]
            self._bytes += span[1]
            self._seen += span[0]
            while len(self._spans) > 1 and self._time - self._spans[0][0] >= self.window:
                dt, db = self._spans.popleft()
                self._time -= dt
                self._bytes -= db
        self._last = (now, delivered, busy)
        return self.rate

    @property
    def rate(self) -> float | None:
        if self._seen < self.min_busy or self._time <= 0:
            return None
        return self._bytes / self._time
