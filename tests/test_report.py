"""Report measures computed from a timeline (xmig.orchestrator.report)."""

from __future__ import annotations

import pytest

from xmig.errors import MigrationAborted, PeerUnreachable
from xmig.events import PhaseChanged, SimProgress
from xmig.orchestrator.report import REPORT_KEYS, Report, aborted_report, bulk_utilization


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


def test_one_report_type_prints_issue_3s_keys_first_then_details_then_the_timeline() -> None:
    report = Report(status="done", backend="qemu", total_s=2.5, details={"disk_seq": 7},
                    timeline=[{"event": "phase", "phase": "brownout"}])
    report.set_downtime(0.1234, "destination clock")
    report.set_wire({"wire_bytes_out": 300, "wire_bytes_in": 100}, guest_bytes=200)
    out = report.to_json()
    assert list(out)[:len(REPORT_KEYS)] == list(REPORT_KEYS)
    assert list(out)[len(REPORT_KEYS):] == ["backend", "downtime_basis", "error", "disk_seq",
                                            "timeline"]
    assert (out["downtime_ms"], out["wire_bytes"], out["wire_ratio"]) == (123.4, 400, 2.0)
    assert out["rounds"] is None and out["verified"] is None  # not measured: null, not absent


def test_an_aborted_report_names_the_cause_of_the_abort() -> None:
    err = MigrationAborted("aborted before GO")
    err.__cause__ = PeerUnreachable("agent gone")
    report = aborted_report(err, backend="sim", source_running=True, timeline=[], to="x:1")
    assert report.status == "aborted" and report.error == "PeerUnreachable: agent gone"
    out = report.to_json()
    assert out["source_running"] is True and out["to"] == "x:1" and out["backend"] == "sim"
