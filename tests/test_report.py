"""Report measures computed from a timeline (xmig.orchestrator.report)."""

from __future__ import annotations

import pytest

from xmig.events import PhaseChanged, SimProgress
from xmig.orchestrator.report import bulk_utilization


def progress(t: float, sent: int, round_: int, bulk_done: bool | None) -> SimProgress:
    disk = None if bulk_done is None else {"bulk_done": bulk_done}
    return SimProgress(t=t, round=round_, pages_left=0, predicted_downtime_ms=0.0,
                       decision="continue", throttle=0.0, dirty_rate_Bps=0.0,
                       memory_rate_Bps=0.0, wire_ratio=1.0, disk=disk,
                       session={"wire_bytes_out": sent})


def test_utilization_counts_only_while_bulk_data_is_pending() -> None:
    link = 100_000_000  # 12.5 MB/s
    timeline = [
        PhaseChanged(t=0.0),
        progress(1.0, 10_000_000, 0, False),
        progress(2.0, 22_500_000, 1, False),  # memory round 0 done; the disk bulk is not
        progress(3.0, 30_000_000, 2, True),  # nothing bulk left: later rounds don't count
        progress(9.0, 31_000_000, 9, True),
    ]
    util, seconds = bulk_utilization(timeline, link)
    assert seconds == 2.0
    assert util == pytest.approx(22_500_000 * 8 / (link * 2.0))


def test_memory_round_zero_is_bulk_without_a_disk() -> None:
    timeline = [progress(0.5, 1_000_000, 0, None), progress(1.0, 2_000_000, 1, None)]
    assert bulk_utilization(timeline, 16_000_000) == (1.0, 0.5)  # 8 Mbit in 0.5 s


def test_no_pending_event_gives_none() -> None:
    assert bulk_utilization([progress(1.0, 5, 3, True)], 10**9) == (None, 0.0)
