"""The convergence controller's decisions, on a fluid model of a guest and a link (no I/O):
a guest that does not outrun the link is never slowed; one whose disk (or memory) outruns it
is slowed evenly, both rates by one factor, and converges; one that cannot converge at the
strongest allowed slowdown is told so with the reason, once its rates are known."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import pytest

from xmig.convergence import Control, ControllerConfig, ConvergenceController, Sample, Verdict

MB = 1_000_000
DT = 0.25


@dataclass
class FluidGuest:
    """A guest dirtying memory (within a hot set) and writing its disk at base rates (both
    slowed by the vCPU throttle, the writes also by the pace), its writes mirrored; a link
    of ``rate`` bytes/s drains the mirror queue, then memory, then the disk's bulk copy."""

    mem_Bps: float
    disk_Bps: float
    rate: float
    bulk: float = 0.0
    memory_left: float = 32 * MB  #: round 0: all of RAM
    hot: float = 8 * MB  #: dirtying re-dirties at most this much
    queue: float = 0.0
    rtt: float = 0.02
    now: float = 0.0
    controls: list[Control] = field(default_factory=list)
    queues: list[float] = field(default_factory=list)  #: after each step

    def step(self, ctl: ConvergenceController) -> Control:
        last = self.controls[-1] if self.controls else None
        throttle = last.throttle if last else 0.0
        pace = last.disk_pace_Bps if last else None
        mem = self.mem_Bps * (1 - throttle)
        disk = self.disk_Bps * (1 - throttle)  # the vCPUs issue the writes too
        held = pace is not None and disk > pace
        disk = min(disk, pace) if pace is not None else disk
        self.queue += disk * DT
        self.memory_left = max(self.memory_left, min(self.hot, self.memory_left + mem * DT))
        budget = self.rate * DT
        for name in ("queue", "memory_left", "bulk"):
            moved = min(getattr(self, name), budget)
            setattr(self, name, getattr(self, name) - moved)
            budget -= moved
        self.queues.append(self.queue)
        self.now += DT
        control = ctl.update(Sample(
            now=self.now, delivery_rate=self.rate, rtt=self.rtt,
            memory_left_bytes=int(self.memory_left), dirty_rate=mem,
            disk_write_rate=disk, mirror_queue_bytes=int(self.queue),
            mirror_held_bytes=int(disk * DT) if held else 0,
            bulk_left_bytes=int(self.bulk)))
        self.controls.append(control)
        return control

    def run(self, ctl: ConvergenceController, seconds: float) -> Control:
        control = self.step(ctl)
        while control.verdict is Verdict.CONTINUE and self.now < seconds:
            control = self.step(ctl)
        return control


def controller(**kw: float) -> ConvergenceController:
    return ConvergenceController(ControllerConfig(**kw), start=0.0)


def test_a_guest_that_does_not_outrun_the_link_is_never_slowed() -> None:
    guest = FluidGuest(mem_Bps=0.5 * MB, disk_Bps=0.2 * MB, rate=12.5 * MB, bulk=64 * MB)
    end = guest.run(controller(), 60)
    assert end.verdict is Verdict.SWITCHOVER
    assert all(c.throttle == 0 and c.disk_pace_Bps is None for c in guest.controls)


def test_a_guest_that_converges_on_its_own_is_slowed_only_once_engaged() -> None:
    # 80 % of the link: it converges, slowly; the planner engages when rounds stall
    guest = FluidGuest(mem_Bps=1.6 * MB, disk_Bps=0, rate=2 * MB, hot=64 * MB)
    ctl = controller()
    for _ in range(8):
        assert guest.step(ctl).throttle == 0
    ctl.engage("rounds stopped shrinking")
    throttle = guest.step(ctl).throttle
    assert throttle == pytest.approx(1 - 0.7 * 2 / 1.6, abs=0.01)
    assert ctl.engaged == "rounds stopped shrinking"
    assert ctl.release().throttle == 0 and not ctl.engaged


def test_a_disk_writer_at_five_times_the_link_is_paced_evenly_and_converges() -> None:
    # the user: 16 Mbit/s link, the disk written at ~5x it, memory at 1x
    rate = 2 * MB
    guest = FluidGuest(mem_Bps=2 * MB, disk_Bps=10 * MB, rate=rate, bulk=32 * MB)
    ctl = controller()
    end = guest.run(ctl, 300)
    assert end.verdict is Verdict.SWITCHOVER, end
    assert end.predicted_blackout_s <= 0.3
    steady = [c for c in guest.controls[8:] if c.disk_pace_Bps is not None]
    assert steady, "the disk writer was never paced"
    for c in steady:
        # one factor for both: the guest's total is held at alpha × the link's share
        f = 1 - c.throttle
        assert c.disk_pace_Bps >= min(1.5 * f * c.disk_base_Bps, c.disk_base_Bps) * 0.999
        assert f * (c.memory_base_Bps + c.disk_base_Bps) <= 0.7 * rate * 1.001
    # it acts once the rates are known (settle_s: the writer runs free that long); from the
    # first paced interval on the queue only drains: paced, never bounded-then-stuck
    first = next(k for k, c in enumerate(guest.controls) if c.disk_pace_Bps is not None)
    assert (first + 1) * DT <= 1.0 + 2 * DT and max(guest.queues) <= 5 * rate
    after = guest.queues[first + 1:]
    assert all(b <= a + 1 for a, b in itertools.pairwise(after))


def test_pacing_does_not_hide_the_writers_demand() -> None:
    guest = FluidGuest(mem_Bps=0.1 * MB, disk_Bps=10 * MB, rate=2 * MB, bulk=64 * MB)
    ctl = controller()
    for _ in range(40):
        guest.step(ctl)
    # the pace bound what was measured; the estimate stays the writer's own rate
    assert ctl.disk_base is not None and ctl.disk_base >= 0.9 * 10 * MB
    assert guest.controls[-1].disk_pace_Bps is not None
    assert guest.controls[-1].disk_pace_Bps < 1.5 * MB  # its share, with the headroom


def test_a_memory_writer_that_outruns_the_link_is_throttled_just_enough() -> None:
    guest = FluidGuest(mem_Bps=4 * MB, disk_Bps=0, rate=2 * MB, hot=64 * MB,
                       memory_left=64 * MB)
    end = guest.run(controller(), 300)
    assert end.verdict is Verdict.SWITCHOVER
    throttles = [c.throttle for c in guest.controls[4:]]
    assert max(throttles) == pytest.approx(1 - 0.7 * 2 / 4, abs=0.02)  # alpha R / base
    assert all(c.disk_pace_Bps is None for c in guest.controls)


def test_a_guest_that_cannot_converge_at_any_allowed_throttle_is_told_so_once_known() -> None:
    # at throttle 0.99 the guest still adds 3 MB/s: more than a 2 MB/s link
    guest = FluidGuest(mem_Bps=250 * MB, disk_Bps=50 * MB, rate=2 * MB, bulk=0,
                       hot=256 * MB)
    ctl = controller(settle_s=2.0)
    end = guest.run(ctl, 60)
    assert end.verdict is Verdict.NOT_CONVERGING
    assert guest.now >= 2.0  # not before the rates are known
    assert "more bandwidth" in end.reason and "2.00 MB/s" in end.reason


def test_a_budget_under_the_commits_round_trips_never_converges() -> None:
    guest = FluidGuest(mem_Bps=0, disk_Bps=0, rate=12.5 * MB, rtt=0.5)
    end = guest.step(controller(budget_s=0.3))
    assert end.verdict is Verdict.NOT_CONVERGING
    assert "round trips" in end.reason and "750 ms" in end.reason


def test_the_timeout_is_the_backstop() -> None:
    # converging, slowly: at 10 % of the link bulk of 1 GB takes longer than the timeout
    guest = FluidGuest(mem_Bps=0, disk_Bps=0, rate=1 * MB, bulk=1000 * MB)
    end = guest.run(controller(timeout_s=5.0), 60)
    assert end.verdict is Verdict.NOT_CONVERGING and "timeout" in end.reason
    assert guest.now == pytest.approx(5.0, abs=DT)


def test_no_rate_yet_predicts_an_infinite_blackout_and_does_not_slow_the_guest() -> None:
    ctl = controller()
    control = ctl.update(Sample(now=0.1, delivery_rate=0.0, memory_left_bytes=MB,
                                dirty_rate=50 * MB, disk_write_rate=50 * MB))
    assert math.isinf(control.predicted_blackout_s)
    assert control.verdict is Verdict.CONTINUE
    assert control.throttle == 0 and control.disk_pace_Bps is None
    assert ctl.release().throttle == 0 and ctl.pace is None


def test_a_bad_configuration_is_refused() -> None:
    for bad in ({"alpha": 1.0}, {"budget_s": 0}, {"max_throttle": 1.0}, {"gain": 0},
                {"bulk_share": 0}):
        with pytest.raises(ValueError):
            ControllerConfig(**bad)
