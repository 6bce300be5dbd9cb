"""The timeline plot: a PNG from a synthetic report, and from a real tiny migration."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from xmig.harness.plot import plot_timeline, timeline_series

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MiB = 1 << 20


def _synthetic_report() -> dict[str, Any]:
    timeline: list[dict[str, Any]] = [{"event": "phase", "phase": "brownout", "t": 0.1}]
    for i in range(20):
        t = 0.2 + 0.1 * i
        timeline.append({
            "event": "progress", "phase": "brownout", "t": t, "round": i // 5,
            "predicted_downtime_ms": 5000.0 / (i + 1), "throttle": min(i * 0.05, 0.6),
            "dirty_rate_Bps": 40e6 - i * 1e6, "memory_rate_Bps": 100e6,
            "wire_ratio": 0.5,
            "disk": {"bulk_applied": i * 8 * MiB, "bulk_data_bytes": i * 6 * MiB,
                     "mirror_bytes_sent": i * MiB, "mirror_queued_bytes": 0},
            "session": {"wire_bytes_out": i * 12 * MiB, "acked_bytes": i * 12 * MiB,
                        "delivery_rate_Bps": 110e6},
        })
    timeline += [
        {"event": "phase", "phase": "blackout", "t": 2.25, "note": "guest paused"},
        {"event": "blackout", "phase": "blackout", "t": 2.27, "step": "mirror drained"},
        {"event": "phase", "phase": "prepare", "t": 2.28},
        {"event": "phase", "phase": "committed", "t": 2.35},
        {"event": "phase", "phase": "done", "t": 2.40},
    ]
    return {"status": "done", "downtime_ms": 150.0, "client_downtime_ms": 160.0,
            "total_s": 2.4, "rounds": 4, "options": {"max_downtime_s": 0.3},
            "link": {"rate_bps": 10**9, "delay_fwd_s": 0.025, "delay_rev_s": 0.025},
            "timeline": timeline}


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return len(data) > 0 and data.startswith(PNG_MAGIC)


def test_plot_synthetic_report(tmp_path: Path) -> None:
    out = tmp_path / "timeline.png"
    plot_timeline(_synthetic_report(), out)
    assert _is_png(out)


def test_series_derived_from_counters() -> None:
    series = timeline_series(_synthetic_report())
    ts, mirror = series["disk_mirror_Bps"]
    assert ts and all(abs(r - MiB / 0.1) < 1e-3 * MiB / 0.1 for r in mirror)
    assert max(series["throttle"][1]) == pytest.approx(0.6)


def test_plot_empty_and_aborted_reports(tmp_path: Path) -> None:
    reports: list[dict[str, Any]] = [
        {}, {"status": "aborted", "timeline": []},
        {"timeline": [{"event": "phase", "phase": "blackout", "t": 1.0}]}]
    for i, report in enumerate(reports):
        out = tmp_path / f"r{i}.png"
        plot_timeline(report, out)
        assert _is_png(out)


@pytest.mark.root
def test_plot_real_tiny_migration(tmp_path: Path) -> None:
    from xmig.guest.sim import SimConfig
    from xmig.guest.sim.source import MigrationOptions
    from xmig.harness.localrun import LocalRun, run_local
    from xmig.netem import LinkSpec

    guest = SimConfig(ram_bytes=64 * MiB, workload="oltp", rate_Bps=20 * MiB,
                      disk_rate_Bps=2 * MiB, seed=1,
                      disk_url="nbd+unix:///?socket=/set-by-run_local")
    run = LocalRun(guest, LinkSpec.symmetric(rate_bps=10**9, rtt_s=0.01),
                   MigrationOptions(), disk_bytes=64 * MiB, warmup_s=0.5)
    report = asyncio.run(run_local(run, workdir=tmp_path / "run")).to_json()
    assert report["status"] == "done"
    assert any(e["event"] == "progress" for e in report["timeline"])
    out = tmp_path / "timeline.png"
    plot_timeline(report, out)
    assert _is_png(out)
