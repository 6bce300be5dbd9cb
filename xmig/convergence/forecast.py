"""A forecast before a migration starts: the controller's model, run ahead. Sans-IO.

From the guest's measured rates (memory dirtied, disk written, unslowed) and the link's
(rate, RTT), :func:`forecast` predicts the total time, the downtime, the throttle needed and
the workload penalty, or says the migration will not converge and what would make it (more
bandwidth, a larger budget). It follows :mod:`xmig.convergence.controller`'s rules:

1. *Bulk*: the disk's bulk copy and memory's first full pass (``one_time`` bytes: what is
   not zero, compressed as the first pass compresses it, :mod:`xmig.convergence.sample`)
   cross while the guest keeps writing. Its disk writes share the link (mirrored below the
   moving cursor, read by the bulk copy above it); a guest that adds at least ``α`` of the
   link's rate (leaving the copy less than the rest: its queue backs up) is slowed to
   ``α × bulk_share`` of it.
2. *Rounds*: what memory dirtied meanwhile (at most its hot set) is sent again and again;
   each round is the last one times ``q``, the guest's rate over the link's (``α`` once
   slowed, the controller engaging when the rounds would not shrink below 0.9). It stops
   when what is left fits the budget after the commit's round trips.
3. *Blackout*: what is left, plus the commit's round trips.

The link carries :data:`GOODPUT` of its rate as payload. The penalty is the time-weighted
throttle. It is a model: the benchmarks report it beside
what happened (``bench/outrun.py``: forecast vs actual).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from xmig.convergence.controller import ControllerConfig

#: rounds slower to shrink than this engage the controller (the planner's stalled rounds)
STALL_RATIO = 0.9
#: payload bytes per byte of link rate the sessions carry (TCP/IP and TLS headers, each
#: connection's ramp): bench/outrun.py measures a link_utilization of 0.91-0.93
GOODPUT = 0.92
#: the strongest throttle a forecast suggests allowing (SDPS's default cap)
MAX_ALLOWED_THROTTLE = 0.99
MAX_ROUNDS = 1000


@dataclass(frozen=True)
class GuestRates:
    """What a guest does, measured before the migration (bytes, bytes/s)."""

    ram_bytes: int
    disk_bytes: int  #: what the bulk copy puts on the wire (data that is not zero)
    dirty_Bps: float  #: distinct memory bytes dirtied per second
    disk_write_Bps: float  #: bytes written to its disk per second
    hot_bytes: int | None = None  #: memory it keeps rewriting (None: all of it)
    wire_ratio: float = 1.0  #: wire bytes per dirtied memory byte
    first_pass_ratio: float | None = None  #: wire bytes per RAM byte in the first pass


@dataclass(frozen=True)
class Forecast:
    converges: bool
    total_s: float | None
    downtime_ms: float | None
    throttle: float  #: the strongest the controller will need (0: none)
    penalty: float  #: the guest's progress lost over the migration, a fraction
    reason: str = ""  #: why not, and what would make it converge
    bandwidth_needed_Bps: float | None = None  #: the least link rate that converges
    budget_needed_ms: float | None = None  #: the least budget that can be kept
    one_time_bytes: int | None = None  #: what the bulk copy and memory's first pass send
    guest: GuestRates | None = None  #: what it was told of the guest
    link_Bps: float | None = None  #: and of the link
    rtt_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        return _rounded(asdict(self))


def _rounded(data: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) else
                _rounded(v) if isinstance(v, dict) else v) for k, v in data.items()}


def forecast(config: ControllerConfig, guest: GuestRates, *, rate_Bps: float,
             rtt_s: float, device_state_bytes: int = 0) -> Forecast:
    """What migrating ``guest`` over a link of ``rate_Bps`` and ``rtt_s`` will take."""
    out = _model(config, guest, rate_Bps=rate_Bps, rtt_s=rtt_s,
                 device_state_bytes=device_state_bytes)
    return replace(out, guest=guest, link_Bps=rate_Bps, rtt_ms=round(rtt_s * 1e3, 1))


def _model(config: ControllerConfig, guest: GuestRates, *, rate_Bps: float,
           rtt_s: float, device_state_bytes: int) -> Forecast:
    cfg, R = config, rate_Bps * GOODPUT
    mem = guest.dirty_Bps * guest.wire_ratio
    g = mem + guest.disk_write_Bps
    floor = cfg.commit_rtts * rtt_s + device_state_bytes / R if R > 0 else math.inf
    slowest = g * (1 - cfg.max_throttle)
    if R <= 0 or slowest >= R:
        need = slowest / cfg.alpha
        allow = 1 - cfg.alpha * R / g if R > 0 else 1.0
        stronger = (f", or allowing a throttle of {allow:.2f}"
                    if cfg.max_throttle < allow < MAX_ALLOWED_THROTTLE else "")
        return Forecast(False, None, None, cfg.max_throttle, cfg.max_throttle,
                        f"even at throttle {cfg.max_throttle:g} the guest adds "
                        f"{slowest / 1e6:.2f} MB/s: a link of {need * 8 / 1e6:.0f} Mbit/s "
                        f"or more would converge{stronger}",
                        bandwidth_needed_Bps=need / GOODPUT)
    if floor >= cfg.budget_s:
        return Forecast(False, None, None, 0.0, 0.0,
                        f"the commit alone takes {floor * 1e3:.0f} ms: a budget of "
                        f"{floor * 1e3 * 1.5:.0f} ms or more could be kept",
                        budget_needed_ms=floor * 1e3 * 1.5)
    # the controller engages while the one-time copy runs once the guest's writes would
    # leave it less than 1 - alpha of the link (its queue backs up)
    engaged = g >= cfg.alpha * R
    # 1. bulk: the slowed guest's disk writes share the link (those below the moving
    # cursor as mirrored writes, those above it read by the bulk copy when it gets there)
    least = 1 - cfg.max_throttle  #: the guest's speed at the strongest throttle
    f1 = max(least, min(1.0, cfg.alpha * cfg.bulk_share * R / g)) if engaged else 1.0
    first = guest.wire_ratio if guest.first_pass_ratio is None else guest.first_pass_ratio
    one_time = guest.disk_bytes + guest.ram_bytes * first
    t1 = one_time / max(R - guest.disk_write_Bps * f1, R * 0.05)
    # 2. rounds: what memory dirtied meanwhile, shrinking by q a round
    hot = guest.hot_bytes if guest.hot_bytes is not None else guest.ram_bytes
    left = min(hot * guest.wire_ratio, mem * f1 * t1)
    q = g / R
    f2 = 1.0
    if q >= STALL_RATIO or engaged:
        f2 = max(least, min(1.0, cfg.alpha * R / g))
        q = g * f2 / R
    fits = (cfg.budget_s - floor) * R
    t2, rounds = 0.0, 0
    while left > fits and rounds < MAX_ROUNDS:
        t2 += left / R
        left *= q
        rounds += 1
    downtime = floor + left / R
    total = t1 + t2 + downtime
    penalty = ((1 - f1) * t1 + (1 - f2) * t2 + downtime) / total
    if left > fits or total > cfg.timeout_s:
        return Forecast(False, round(total, 3), round(downtime * 1e3, 1),
                        round(max(1 - f1, 1 - f2), 4), round(penalty, 4),
                        f"the pre-copy would take {total:.0f} s and leave "
                        f"{downtime * 1e3:.0f} ms, over the timeout of {cfg.timeout_s:g} s or "
                        f"the budget of {cfg.budget_s * 1e3:.0f} ms: a faster link, a longer "
                        "timeout or a stronger throttle would converge",
                        one_time_bytes=round(one_time))
    return Forecast(True, round(total, 3), round(downtime * 1e3, 1),
                    round(max(1 - f1, 1 - f2), 4), round(penalty, 4),
                    one_time_bytes=round(one_time))
