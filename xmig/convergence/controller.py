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
of the link drains what is left; ``α × bulk_share`` while the disk's bulk copy still runs, so
the copy moves on) by slowing *both* by one factor ``f = min(1, target ÷ (mem + disk))``:
throttle ``1 − f`` for the vCPUs, pace ``f × disk`` for the acknowledgements. Whichever of the
two outruns the link, the guest is slowed evenly and just enough, never stopped.

It slows nothing until it is *engaged*: by itself as soon as the guest alone adds at least
``R`` (nothing could ever drain; judged once the rates are known, after ``settle_s``), or by
:meth:`ConvergenceController.engage` when the pre-copy's rounds stopped shrinking (the
planner's ENGAGE_SDPS). A guest that converges on its own is never slowed.

The base (unslowed) rates are estimated from what was measured under the last control: the
dirty rate ÷ ``(1 − throttle)``; the disk-write rate as measured while the pacer held no write
(when it held some, the pace bound it and the estimate is kept). Both are smoothed.

Verdicts:

- SWITCHOVER when the bulk copy is done and the prediction fits the budget;
- NOT_CONVERGING, with the reason and the figures, only when even the strongest allowed
  slowdown cannot fit the budget: the commit's round trips and the device state alone
  exceed it, or the guest at ``max_throttle`` and ``min_disk_fraction`` of its disk rate
  still adds at least ``R`` (after ``settle_s``, once the rates are known); or, the
  backstop, past ``timeout_s``;
- CONTINUE otherwise.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


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
    max_throttle: float = 0.99  #: the strongest vCPU throttle allowed
    min_disk_fraction: float = 0.05  #: the slowest pace, as a share of the disk's rate
    min_pace_Bps: float = 64 * 1024  #: and never slower than this
    gain: float = 0.5  #: weight of a new sample in the smoothed base rates
    settle_s: float = 2.0  #: rates are trusted after this long (for NOT_CONVERGING)
    timeout_s: float = 600.0  #: the backstop

    def __post_init__(self) -> None:
        if self.budget_s <= 0 or self.timeout_s <= 0:
            raise ValueError("the downtime budget and the timeout must be positive")
        if not 0 < self.alpha < 1 or not 0 < self.bulk_share <= 1:
            raise ValueError("alpha must be within (0, 1) and bulk_share within (0, 1]")
        if not 0 < self.max_throttle < 1 or not 0 < self.min_disk_fraction <= 1:
            raise ValueError("max_throttle within (0, 1), min_disk_fraction within (0, 1]")
        if not 0 < self.gain <= 1:
            raise ValueError("gain must be within (0, 1]")


@dataclass(frozen=True)
class Sample:
    """What the engine measured over the last interval (bytes, bytes/s, seconds)."""

    now: float
    delivery_rate: float  #: wire bytes/s the link delivers (0: not known yet)
    rtt: float = 0.0  #: smoothed (queueing included)
    base_rtt: float = 0.0  #: the least seen: the path's own (0: not known, use rtt)
    memory_left_bytes: int = 0  #: dirty and not yet sent (raw)
    dirty_rate: float = 0.0  #: measured under the throttle in effect
    wire_ratio: float = 1.0  #: wire bytes per raw page byte
    memory_backlog_bytes: int = 0  #: sent, not yet delivered
    disk_write_rate: float = 0.0  #: mirrored guest writes submitted, bytes/s
    mirror_queue_bytes: int = 0  #: queued and held: what a drain must move
    mirror_held: bool = False  #: the pacer held writes in this interval (the pace bound)
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
        cfg = self.config
        self._estimate(s)
        predicted = self.predict(s)
        mem = (self.memory_base or 0.0) * max(s.wire_ratio, 1e-3)
        disk = self.disk_base or 0.0
        known = s.now - self.start >= cfg.settle_s  # the first rates overstate or understate
        if known and s.delivery_rate > 0 and mem + disk >= s.delivery_rate:
            self.engage(f"the guest adds {(mem + disk) / 1e6:.2f} MB/s (memory "
                        f"{mem / 1e6:.2f}, disk {disk / 1e6:.2f}), at least the link's "
                        f"{s.delivery_rate / 1e6:.2f} MB/s")
        if s.delivery_rate > 0 and self.engaged:
            target = cfg.alpha * s.delivery_rate * (cfg.bulk_share if s.bulk_left_bytes else 1)
            f = 1.0 if mem + disk <= target else target / (mem + disk)
            self._actuate(f, disk)
        verdict, reason = self._verdict(s, predicted, mem, disk)
        return Control(self.throttle, self.pace, predicted, verdict, reason,
                       memory_base_Bps=mem, disk_base_Bps=disk)

    def release(self) -> Control:
        """Full speed (switchover, abort); disengaged."""
        self.throttle, self.pace, self.engaged = 0.0, None, ""
        return Control(0.0, None, 0.0, Verdict.CONTINUE, "released")

    # -- internals --------------------------------------------------------------------

    def _estimate(self, s: Sample) -> None:
        gain = self.config.gain
        speed = max(1.0 - self.throttle, 1.0 - self.config.max_throttle)
        mem = s.dirty_rate / speed
        self.memory_base = mem if self.memory_base is None else (
            self.memory_base + gain * (mem - self.memory_base))
        if s.mirror_held and self.disk_base is not None:
            return  # the pace bound what was measured: the guest wants more; keep it
        disk = s.disk_write_rate
        self.disk_base = disk if self.disk_base is None else (
            self.disk_base + gain * (disk - self.disk_base))

    def _actuate(self, f: float, disk: float) -> None:
        cfg = self.config
        self.throttle = min(max(1.0 - f, 0.0), cfg.max_throttle)
        self.max_throttle_seen = max(self.max_throttle_seen, self.throttle)
        if f >= 1.0 or disk <= 0:
            self.pace = None
        else:
            self.pace = max(f * disk, cfg.min_disk_fraction * disk, cfg.min_pace_Bps)

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
        slowest = mem * (1 - cfg.max_throttle) + max(cfg.min_disk_fraction * disk,
                                                     min(disk, cfg.min_pace_Bps))
        if elapsed >= cfg.settle_s and s.delivery_rate > 0 and slowest >= s.delivery_rate:
            return Verdict.NOT_CONVERGING, (
                f"even at throttle {cfg.max_throttle:g} and the slowest disk pace the guest "
                f"adds {slowest / 1e6:.2f} MB/s, at least the link's "
                f"{s.delivery_rate / 1e6:.2f} MB/s: more bandwidth would make it converge")
        if elapsed >= cfg.timeout_s:
            return Verdict.NOT_CONVERGING, (
                f"predicted {predicted * 1e3:.0f} ms after {elapsed:.1f} s (timeout "
                f"{cfg.timeout_s:.0f} s, budget {budget_ms:.0f} ms)")
        return Verdict.CONTINUE, ""
