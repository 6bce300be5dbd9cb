"""A simulated pre-copy: a guest whose dirty rate is ``base × (1 − throttle)`` and a link of
fixed rate, driven by the real planner and a throttle controller. Sans-IO, deterministic.

Used by the tests (SDPS against auto-converge) and by the benchmark that chose α. The guest
dirties pages of a working set: the distinct pages dirtied since the last fetch are
``wss × (1 − exp(−writes ÷ wss))`` (uniform writes over the set), the rate it reports lags
the truth (a moving average over ``lag`` seconds) and may be off by seeded noise.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

from xmig.memory.precopy import Decision, Figures, PlannerConfig, PrecopyPlanner
from xmig.memory.sdps.base import ThrottleController


@dataclass(frozen=True)
class SimGuest:
    memory: float = 1 << 30  #: bytes of RAM (round 0 sends it all, × ``wire_ratio``)
    base_dirty: float = 25e6  #: bytes/s of writes at throttle 0
    wss: float = 256 << 20  #: bytes of the working set the writes fall in
    lag: float = 0.5  #: seconds the reported dirty rate averages over
    noise: float = 0.0  #: relative error of each reported rate (uniform ±)


@dataclass(frozen=True)
class SimLink:
    rate: float = 12.5e6  #: bytes/s for memory
    rtt: float = 0.1
    wire_ratio: float = 1.0


@dataclass
class SimResult:
    converged: bool
    time: float  #: seconds until the switchover (or the timeout)
    downtime: float  #: predicted downtime at the switchover (inf if none)
    rounds: int
    max_throttle: float
    penalty: float  #: time-averaged throttle (the workload penalty of the stalls)
    engaged_at: float | None = None  #: when the planner decided ENGAGE_SDPS
    trace: list[tuple[float, float]] = field(default_factory=list)  #: (time, throttle)


def simulate(controller: ThrottleController | None, guest: SimGuest, link: SimLink,
             config: PlannerConfig, *, dt: float = 0.01, interval: float = 0.25,
             seed: int = 0) -> SimResult:
    """Run one pre-copy until the planner says SWITCHOVER or NOT_CONVERGING."""
    rng = random.Random(seed)
    planner = PrecopyPlanner(config, start=0.0)
    t, throttle, engaged = 0.0, 0.0, False
    engaged_at: float | None = None
    pending = guest.memory  # raw bytes of the round being sent
    round_bytes = pending
    writes = 0.0  # bytes written since the last fetch
    meter: deque[float] = deque(maxlen=max(1, round(guest.lag / dt)))  # moving average
    next_update, area = interval, 0.0
    trace = [(0.0, 0.0)]
    planner.on_round(int(pending))
    while True:
        rate = guest.base_dirty * (1 - throttle)
        writes += rate * dt
        meter.append(rate)
        pending = max(0.0, pending - link.rate * dt / link.wire_ratio)
        area += throttle * dt
        t += dt
        if engaged and controller is not None and t >= next_update:
            next_update = t + interval
            noisy = sum(meter) / len(meter) * (1 + guest.noise * (2 * rng.random() - 1))
            throttle = controller.update(now=t, delivery_rate=link.rate, dirty_rate=noisy,
                                         wire_ratio=link.wire_ratio)
            trace.append((t, throttle))
        if pending > 0:
            continue
        dirty = guest.wss * (1 - math.exp(-writes / guest.wss))
        writes = 0.0
        if controller is not None:
            throttle = controller.on_round(now=t, dirty_bytes=int(dirty),
                                           sent_bytes=int(round_bytes))
            trace.append((t, throttle))
        planner.on_round(int(dirty))
        verdict = planner.decide(now=t, figures=Figures(
            remaining_bytes=int(dirty), delivery_rate=link.rate,
            wire_ratio=link.wire_ratio, rtt=link.rtt, dirty_rate=sum(meter) / len(meter)))
        max_seen = max(th for _, th in trace)
        if verdict.decision is Decision.SWITCHOVER:
            return SimResult(True, t, verdict.predicted_downtime, planner.round, max_seen,
                             area / t, engaged_at, trace)
        if verdict.decision is Decision.NOT_CONVERGING:
            return SimResult(False, t, math.inf, planner.round, max_seen, area / t,
                             engaged_at, trace)
        if verdict.decision is Decision.ENGAGE_SDPS:
            engaged, engaged_at = True, t
        pending = round_bytes = dirty
