"""The convergence controller: one model of memory and disk, two actuators. Sans-IO.

Every interval the engine hands :meth:`ConvergenceController.update` a :class:`Sample` and
gets a :class:`Control` back: the vCPU throttle, the pace (bytes/s) at which the guest's
mirrored disk writes are acknowledged (:meth:`xmig.storage.mirror.MirrorQueue.set_pace`),
the predicted blackout and a verdict.

The model, with ``R`` the link's delivery rate (wire bytes/s, every channel)::

    blackout ≈ (memory left × wire ratio + memory backlog + mirror queue + bulk left
                + device state) ÷ R + commit_rtts × RTT

What is left shrinks only while the guest adds less than ``R``. The guest adds
``mem = base dirty rate × wire ratio`` (memory) and ``disk = base disk-write rate``
(mirrored writes, sent raw). The controller holds their sum at ``α × R`` (``α < 1``: the rest
of the link drains what is left; ``α × bulk_share`` while the disk's bulk copy still runs or
the mirror queue holds more than ``queue_engage_s`` of link, so that they drain) by slowing
*both* by one factor ``f = min(1, target ÷ (mem + disk))``: throttle ``1 − f`` for the
vCPUs, pace ``1.5 × f × disk`` for the acknowledgements. Whichever of the
two outruns the link, the guest is slowed evenly and just enough, never stopped. One floor:
the pace never leaves the writes waiting now (the mirror's held bytes) more than
``ack_delay_s`` to wait (a guest's I/O timeouts are seconds; Little's law makes its
queue depth ÷ the pace its latency); when that floor binds, memory takes the rest of the
slowdown.

It slows nothing until it is *engaged*: by itself as soon as the guest alone adds at least
``R`` (nothing could ever drain) or the mirror queue holds more than ``queue_engage_s`` of
the link — both judged once the rates are known, after ``settle_s`` of a busy link — or by
:meth:`ConvergenceController.engage` when the pre-copy's rounds stopped shrinking (the
planner's ENGAGE_SDPS). A guest that converges on its own is never slowed.

The base (unslowed) rates are estimated from what was measured under the last controls: the
dirty rate and the disk-write rate (the vCPUs issue the writes too) ÷ the time-averaged
``1 − throttle`` over the guest meter's window (dividing by the newest throttle alone, the
lagging measure over a rising throttle ran away to the strongest). The pace is set
``PACE_HEADROOM`` above the disk's share, so it binds only on writes the throttle does not
slow; what it then measures raises the next estimate by as much, until it no longer binds.
Both are smoothed. ``R`` is the most the link delivered over the last ``rate_window_s``: a
slowed guest leaves the link idle, and the delivery rate measured then says what the guest
sent, not what the link can carry.

Verdicts:

- SWITCHOVER when the bulk copy is done and the prediction fits the budget;
- NOT_CONVERGING, with the reason and the figures, only when even the strongest allowed
  slowdown cannot fit the budget: the commit's round trips and the device state alone
  exceed it, or the guest at ``max_throttle`` (which slows its writes as its dirtying: the
  vCPUs issue both) still adds at least ``R``, the rates known, for ``infeasible_s`` on
  end; or, the backstop, past ``timeout_s``;
- CONTINUE otherwise.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections import deque
from dataclasses import dataclass

#: below this share of full speed the base rates are updated with proportionally less weight
TRUSTED_SPEED = 0.1
#: the pace is this much above the disk's share of the target: it binds only on writes that
#: the vCPU throttle does not slow, and then the next estimate rises by as much
PACE_HEADROOM = 1.5


class Verdict(enum.StrEnum):
    CONTINUE = "continue"
    SWITCHOVER = "switchover"
    NOT_CONVERGING = "not_converging"


@dataclass(frozen=True)
class ControllerConfig:
    budget_s: float = 0.3  #: the whole pause-to-resume the guest may see
    alpha: float = 0.7  #: the share of the link the guest's own writing may use
    bulk_share: float = 0.5  #: × alpha while the disk's bulk copy runs
    commit_rtts: float = 1.5  #: WAN round trips between pause and resume
    max_throttle: float = 0.99  #: the strongest vCPU throttle allowed (0: SDPS off)
    min_pace_Bps: float = 64 * 1024  #: and never slower than this
    gain: float = 0.5  #: weight of a new sample in the smoothed base rates
    window_s: float = 0.5  #: the guest's dirty-rate meter averages over about this long
    rate_window_s: float = 10.0  #: R is the most delivered over this long
    queue_engage_s: float = 0.25  #: a mirror queue of this much link engages the controller
    ack_delay_s: float = 0.05  #: the writes waiting now leave within this (a pace floor)
    settle_s: float = 1.0  #: rates are trusted (and acted on) after this long of a busy link
    infeasible_s: float = 3.0  #: NOT_CONVERGING once the guest has outrun R this long
    timeout_s: float = 600.0  #: the backstop

    def __post_init__(self) -> None:
        if self.budget_s <= 0 or self.timeout_s <= 0:
            raise ValueError("the downtime budget and the timeout must be positive")
        if not 0 < self.alpha < 1 or not 0 < self.bulk_share <= 1:
            raise ValueError("alpha must be within (0, 1) and bulk_share within (0, 1]")
        if not 0 <= self.max_throttle < 1:
            raise ValueError("max_throttle must be within [0, 1) (0: never slowed)")
        if not 0 < self.gain <= 1:
            raise ValueError("gain must be within (0, 1]")


@dataclass(frozen=True)
class Sample:
    """What the engine measured over the last interval (bytes, bytes/s, seconds)."""

    now: float
    delivery_rate: float
    """Wire bytes/s the link delivers, measured while the sender kept a backlog (0: not
    measured now: an idle or starting link's rate says what was sent, not what it carries)"""
    rtt: float = 0.0  #: smoothed (queueing included)
    base_rtt: float = 0.0  #: the least seen: the path's own (0: not known, use rtt)
    memory_left_bytes: int = 0  #: dirty and not yet sent (raw)
    dirty_rate: float = 0.0  #: measured under the throttle in effect
    wire_ratio: float = 1.0  #: wire bytes per raw page byte
    memory_backlog_bytes: int = 0  #: sent, not yet delivered
    disk_write_rate: float | None = 0.0  #: mirrored guest writes, bytes/s (None: unknown)
    mirror_queue_bytes: int = 0  #: queued and held: what a drain must move
    mirror_held_bytes: int = 0  #: writes waiting for their acknowledgement now
    bulk_left_bytes: int = 0  #: the disk's bulk copy, not yet delivered
    device_state_bytes: int = 0


@dataclass(frozen=True)
class Control:
    """What to do until the next sample."""

    throttle: float  #: the vCPU throttle, 0 … max_throttle
    disk_pace_Bps: float | None  #: the acknowledgement pace; None: unpaced
    predicted_blackout_s: float  #: pausing now
    verdict: Verdict
    reason: str = ""
    memory_base_Bps: float = 0.0  #: the estimated unslowed rates (wire bytes/s)
    disk_base_Bps: float = 0.0


class ConvergenceController:
    """Decides both of the guest's rates every interval; all times are ``now`` passed in."""

    def __init__(self, config: ControllerConfig, *, start: float) -> None:
        self.config = config
        self.start = start
        self.throttle = 0.0
        self.pace: float | None = None
        self.max_throttle_seen = 0.0
        self.memory_base: float | None = None  #: raw dirty bytes/s, unthrottled
        self.disk_base: float | None = None  #: bytes/s, unpaced
        self.engaged = ""  #: why the guest is being slowed ("": it is not)
        self._throttles: deque[tuple[float, float]] = deque([(start, 0.0)])  #: (since, th)
        self._rates: deque[tuple[float, float]] = deque()  #: (at, delivery rate)
        self._busy_s = 0.0  #: time the link was measured busy
        self._last_now: float | None = None
        self._infeasible_since: float | None = None

    def engage(self, reason: str) -> None:
        """Slow the guest from the next update on, as much as needed (idempotent)."""
        self.engaged = self.engaged or reason

    def predict(self, s: Sample) -> float:
        """Seconds the guest would be paused if it were paused now (inf with no rate)."""
        wire = (s.memory_left_bytes * s.wire_ratio + s.memory_backlog_bytes
                + s.mirror_queue_bytes + s.bulk_left_bytes + s.device_state_bytes)
        if wire <= 0:
            return self.config.commit_rtts * s.rtt
        if s.delivery_rate <= 0:
            return math.inf
        return wire / s.delivery_rate + self.config.commit_rtts * s.rtt

    def update(self, s: Sample) -> Control:
        if s.delivery_rate > 0 and self._last_now is not None:
            self._busy_s += s.now - self._last_now
        self._last_now = s.now
        s = dataclasses.replace(s, delivery_rate=self._capacity(s.now, s.delivery_rate))
        self._estimate(s)
        predicted = self.predict(s)
        mem = (self.memory_base or 0.0) * max(s.wire_ratio, 1e-3)
        disk = self.disk_base or 0.0
        if self.known:  # the first rates overstate or understate
            self._engage_if_needed(s, mem, disk)
        if s.delivery_rate > 0 and self.engaged:
            self._actuate(s, mem, disk)
        verdict, reason = self._verdict(s, predicted, mem, disk)
        return Control(self.throttle, self.pace, predicted, verdict, reason,
                       memory_base_Bps=mem, disk_base_Bps=disk)

    @property
    def known(self) -> bool:
        """The rates have been measured on a busy link for ``settle_s``."""
        return self._busy_s >= self.config.settle_s

    def release(self) -> Control:
        """Full speed (switchover, abort); disengaged."""
        self.throttle, self.pace, self.engaged = 0.0, None, ""
        self._throttles.append((self._throttles[-1][0], 0.0))
        return Control(0.0, None, 0.0, Verdict.CONTINUE, "released")

    # -- internals --------------------------------------------------------------------

    def _capacity(self, now: float, rate: float) -> float:
        """The most the link delivered within the last ``rate_window_s``."""
        rates = self._rates
        if rate > 0:
            while rates and rates[-1][1] <= rate:
                rates.pop()  # a monotone deque: the front is the window's max
            rates.append((now, rate))
        while rates and rates[0][0] < now - self.config.rate_window_s:
            rates.popleft()
        return rates[0][1] if rates else 0.0

    def _speed(self, now: float) -> float:
        """The time-averaged ``1 − throttle`` over the last ``window_s``."""
        start, hist = now - self.config.window_s, self._throttles
        while len(hist) > 1 and hist[1][0] <= start:
            hist.popleft()
        total = 0.0
        for k, (since, th) in enumerate(hist):
            until = hist[k + 1][0] if k + 1 < len(hist) else now
            total += max(until - max(since, start), 0.0) * (1.0 - th)
        span = now - max(hist[0][0], start)
        return total / span if span > 0 else 1.0 - hist[-1][1]

    def _estimate(self, s: Sample) -> None:
        speed = max(self._speed(s.now), 1.0 - self.config.max_throttle)
        # under a strong throttle a measure is a small rate divided by a small speed: noise
        # and lag, amplified; trust it less
        gain = self.config.gain * min(1.0, speed / TRUSTED_SPEED)
        mem = s.dirty_rate / speed
        self.memory_base = mem if self.memory_base is None else (
            self.memory_base + gain * (mem - self.memory_base))
        if s.disk_write_rate is None:
            return
        # the vCPUs issue the guest's writes too: the throttle slows them as it slows
        # memory. A pace that bound the measure (PACE_HEADROOM above the share) makes the
        # next estimate that much higher: it probes until the pace no longer binds
        disk = s.disk_write_rate / speed
        self.disk_base = disk if self.disk_base is None else (
            self.disk_base + gain * (disk - self.disk_base))

    def _engage_if_needed(self, s: Sample, mem: float, disk: float) -> None:
        rate, cfg = s.delivery_rate, self.config
        if rate > 0 and mem + disk >= rate:
            self.engage(f"the guest adds {(mem + disk) / 1e6:.2f} MB/s (memory "
                        f"{mem / 1e6:.2f}, disk {disk / 1e6:.2f}), at least the link's "
                        f"{rate / 1e6:.2f} MB/s")
        if rate > 0 and s.mirror_queue_bytes > rate * cfg.queue_engage_s:
            self.engage(f"the mirror queue holds {s.mirror_queue_bytes / 1e6:.2f} MB, over "
                        f"{cfg.queue_engage_s:g} s of the link's {rate / 1e6:.2f} MB/s")

    def _actuate(self, s: Sample, mem: float, disk: float) -> None:
        """Both rates slowed by one factor to the target; the pace never so slow that the
        writes waiting now wait longer than ``ack_delay_s`` (a floor of at most half the
        target): then memory takes the rest of the slowdown."""
        cfg = self.config
        # one-time work waits (the bulk copy, or a mirror queue of more than
        # queue_engage_s of link): the guest gets the smaller share, so that it drains
        backlog = s.mirror_queue_bytes > s.delivery_rate * cfg.queue_engage_s
        share = cfg.bulk_share if s.bulk_left_bytes or backlog else 1.0
        target = cfg.alpha * s.delivery_rate * share
        if mem + disk <= target:
            self.pace, throttle = None, 0.0
        else:
            f = target / (mem + disk)
            pace = f * disk * PACE_HEADROOM
            if disk > 0:
                floor = max(cfg.min_pace_Bps,
                            min(s.mirror_held_bytes / cfg.ack_delay_s, target / 2))
                pace = min(max(pace, floor), disk)
            self.pace = pace if disk > 0 and pace < disk else None
            left = max(target - min(pace, f * disk), 0.0)  # for memory
            throttle = 1.0 - left / mem if mem > left else 0.0
        self.throttle = min(max(throttle, 0.0), cfg.max_throttle)
        if self.throttle != self._throttles[-1][1]:
            self._throttles.append((s.now, self.throttle))
        self.max_throttle_seen = max(self.max_throttle_seen, self.throttle)

    def _verdict(self, s: Sample, predicted: float, mem: float, disk: float
                 ) -> tuple[Verdict, str]:
        cfg = self.config
        budget_ms = cfg.budget_s * 1e3
        if s.bulk_left_bytes == 0 and predicted <= cfg.budget_s:
            return Verdict.SWITCHOVER, f"predicted {predicted * 1e3:.0f} ms fits the budget"
        # queueing inflates the smoothed RTT while pre-copy fills the link; the commit's
        # messages cross an emptied link: its floor is set by the least RTT seen
        floor = cfg.commit_rtts * (s.base_rtt or s.rtt) + (
            s.device_state_bytes / s.delivery_rate if s.delivery_rate > 0 else 0.0)
        if s.delivery_rate > 0 and floor > cfg.budget_s:
            return Verdict.NOT_CONVERGING, (
                f"the commit's {cfg.commit_rtts:g} round trips and the device state alone "
                f"take {floor * 1e3:.0f} ms, over the {budget_ms:.0f} ms budget")
        elapsed = s.now - self.start
        slowest = (mem + disk) * (1 - cfg.max_throttle)  # the vCPUs issue both
        if not (self.known and s.delivery_rate > 0 and slowest >= s.delivery_rate):
            self._infeasible_since = None
        elif self._infeasible_since is None:
            self._infeasible_since = s.now
        elif s.now - self._infeasible_since >= cfg.infeasible_s:
            return Verdict.NOT_CONVERGING, (
                f"even at throttle {cfg.max_throttle:g} the guest "
                f"adds {slowest / 1e6:.2f} MB/s, at least the link's "
                f"{s.delivery_rate / 1e6:.2f} MB/s: more bandwidth would make it converge")
        if elapsed >= cfg.timeout_s:
            return Verdict.NOT_CONVERGING, (
                f"predicted {predicted * 1e3:.0f} ms after {elapsed:.1f} s (timeout "
                f"{cfg.timeout_s:.0f} s, budget {budget_ms:.0f} ms)")
        return Verdict.CONTINUE, ""
