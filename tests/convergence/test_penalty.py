"""The penalty bound: the one-time copy paced from the guest's progress (no I/O)."""

from __future__ import annotations

from itertools import pairwise

import pytest

from xmig.convergence.penalty import PenaltyConfig, PenaltyGovernor

LINK = 12.5e6


def test_a_guest_slowed_past_the_bound_paces_the_copy_down_to_a_floor() -> None:
    gov = PenaltyGovernor(PenaltyConfig(0.1), baseline=1000.0)
    caps = [gov.update(now=t * 0.25, progress_rate=700.0, delivered_Bps=LINK, copying=True)
            for t in range(160)]
    assert caps[0] is not None and caps[0] == pytest.approx(0.8 * LINK)
    paced = [c for c in caps if c is not None]
    assert all(b <= a for a, b in pairwise(paced))
    # down once a second (a cap shows in the guest's pace only after its rate window)
    assert caps[3] == caps[0] and caps[4] == pytest.approx(0.64 * LINK)
    floor = gov.config.min_rate_Bps
    assert floor in caps  # never slower than the floor
    # still slowed a hold later with the copy at its floor: not the copy's doing, let go
    assert caps[-1] is None and gov.cost.gave_up
    assert gov.cost.min_cap_Bps == floor
    assert gov.cost.max_penalty_seen == pytest.approx(0.3, abs=0.01)


def test_a_guest_back_at_its_pace_lifts_the_cap_step_by_step_then_entirely() -> None:
    gov = PenaltyGovernor(PenaltyConfig(0.1), baseline=1000.0)
    gov.update(now=0.0, progress_rate=500.0, delivered_Bps=LINK, copying=True)
    capped = gov.cap
    assert capped is not None
    caps = [gov.update(now=0.25 * t, progress_rate=1000.0, delivered_Bps=capped, copying=True)
            for t in range(1, 40)]
    # while the smoothed penalty is still over the bound the cap falls; then it holds and
    # rises by 10 % a step, and goes once it is twice what the link delivered
    paced = [c for c in caps if c is not None]
    low = paced.index(min(paced))
    assert low > 0 and all(b <= a for a, b in pairwise(paced[:low + 1]))
    assert all(b >= a for a, b in pairwise(paced[low:]))
    assert paced[-1] > paced[low] and caps[-1] is None


def test_within_the_bound_nothing_is_paced_and_after_the_copy_nothing_is() -> None:
    gov = PenaltyGovernor(PenaltyConfig(0.2), baseline=1000.0)
    assert gov.update(now=0.0, progress_rate=900.0, delivered_Bps=LINK, copying=True) is None
    gov2 = PenaltyGovernor(PenaltyConfig(0.05), baseline=1000.0)
    assert gov2.update(now=0.0, progress_rate=500.0, delivered_Bps=LINK, copying=True)
    assert gov2.update(now=0.25, progress_rate=500.0, delivered_Bps=LINK,
                       copying=False) is None  # later rounds are the controller's


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1])
def test_a_bound_outside_zero_to_one_is_refused(bad: float) -> None:
    with pytest.raises(ValueError):
        PenaltyConfig(bad)
