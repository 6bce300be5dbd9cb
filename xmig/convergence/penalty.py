"""A penalty bound (``--max-penalty``): the one-time copy paced so the guest keeps its pace.

The one-time copy (the disk's bulk copy and memory's first pass) is most of a migration's
work, and on a host whose cores the guest shares it costs the guest CPU: encoding,
encryption, reads. :class:`PenaltyGovernor` watches the guest's own progress against its
pace before the migration and, while the one-time copy runs, sets a cap on the session's
data rate: down by :attr:`PenaltyConfig.decrease` of what the link delivers whenever the
smoothed penalty is over the bound (at most once per :attr:`PenaltyConfig.hold_s`, the time
a cap takes to show in the guest's progress), back up by :attr:`PenaltyConfig.increase` while it is
under half of it, and off (no cap) once the cap is well above what the link carries or the
copy is done. A guest still slowed past the bound with the copy paced to its floor is
slowed by something else (its host, its own work): pacing is then let go for the rest of
the copy (``gave_up`` in the cost) rather than stretch the migration for nothing. Later
rounds are the convergence controller's, whose vCPU throttle the bound
also caps (a throttle of ``t`` costs the guest ``t`` of its pace): a guest that outruns the
link at that throttle does not converge, and says so. Sans-IO: ``now`` is passed in; what
it cost (time paced, the lowest cap) is kept for the report.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PenaltyConfig:
    max_penalty: float  #: the guest's progress may fall this fraction below its pace
    min_rate_Bps: float = 256 * 1024  #: the copy is never paced slower than this
    decrease: float = 0.8  #: × the delivered rate when over the bound
    increase: float = 1.1  #: × the cap while under half of it
    gain: float = 0.3  #: weight of a new progress sample in the smoothed rate
    #: after a decrease the next waits this long: a cap shows in the guest's progress only
    #: after its rate window (the reference guest's is 0.5 s) and the smoothing
    hold_s: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.max_penalty < 1:
            raise ValueError("max_penalty must be within (0, 1)")
        if not 0 < self.decrease < 1 < self.increase or not 0 < self.gain <= 1:
            raise ValueError("decrease within (0, 1), increase over 1, gain within (0, 1]")


@dataclass
class PenaltyCost:
    """What keeping the bound cost, for the report."""

    paced_s: float = 0.0  #: time the copy ran under a cap
    min_cap_Bps: float | None = None  #: the lowest cap set
    max_penalty_seen: float = 0.0  #: the highest smoothed penalty while copying
    gave_up: bool = False  #: paced to the floor, the guest stayed slowed: pacing let go


class PenaltyGovernor:
    """Sets the copy's rate cap from the guest's progress (see the module docstring)."""

    def __init__(self, config: PenaltyConfig, *, baseline: float) -> None:
        if baseline <= 0:
            raise ValueError("the guest's pace before the migration must be positive")
        self.config, self.baseline = config, baseline
        self.cap: float | None = None  #: bytes/s; None: not capped
        self.cost = PenaltyCost()
        self._rate: float | None = None
        self._last: float | None = None
        self._decreased: float | None = None  #: when the cap last went down

    @property
    def penalty(self) -> float:
        """The smoothed penalty: 1 − progress ÷ pace before (0 before a sample)."""
        return 0.0 if self._rate is None else max(0.0, 1.0 - self._rate / self.baseline)

    def update(self, *, now: float, progress_rate: float, delivered_Bps: float,
               copying: bool) -> float | None:
        """A progress sample (units/s, the unit of ``baseline``) and what the session
        delivered (bytes/s); returns the cap to set (None: none)."""
        cfg = self.config
        if self._last is not None and self.cap is not None:
            self.cost.paced_s += now - self._last
        self._last = now
        self._rate = progress_rate if self._rate is None else (
            (1 - cfg.gain) * self._rate + cfg.gain * progress_rate)
        if not copying:
            self.cap = None
            return None
        penalty = self.penalty
        self.cost.max_penalty_seen = max(self.cost.max_penalty_seen, penalty)
        if self.cost.gave_up:
            return None
        if penalty > cfg.max_penalty:
            if self._decreased is not None and now - self._decreased < cfg.hold_s:
                return self.cap
            if self.cap == cfg.min_rate_Bps:
                # paced to the floor for a hold and the guest is still slowed: the copy is
                # not what slows it, and pacing it further would only stretch the migration
                self.cost.gave_up = True
                self.cap = None
                return None
            self._decreased = now
            base = delivered_Bps if self.cap is None else min(self.cap, delivered_Bps)
            self.cap = max(cfg.min_rate_Bps, cfg.decrease * base)
            low = self.cost.min_cap_Bps
            self.cost.min_cap_Bps = self.cap if low is None else min(low, self.cap)
        elif self.cap is not None and penalty < cfg.max_penalty / 2:
            self.cap *= cfg.increase
            if delivered_Bps > 0 and self.cap > 2 * delivered_Bps:
                self.cap = None  # the link, not the cap, is what limits the copy now
        return self.cap
