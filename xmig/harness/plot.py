"""The timeline of one migration as a PNG (``xmig migrate --plot``, ``bench/longhaul.py``).

Reads the ``timeline`` of a final report (DESIGN.md "Measures"): the ``progress`` events
give the memory and dirty rates, the throttle and the predicted downtime; the disk's bulk
and mirror rates and the total wire rate are derived from the byte counters of successive
progress events; ``phase`` events give the phase boundaries, and the blackout (guest
paused to destination running) is shaded with the measured downtime written on it.

matplotlib is imported here only, with the Agg backend (no display needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

MB = 1e6
PREDICTED_CAP_MS = 100_000.0

#: phases after which the guest runs on neither side until ``done``
_BLACKOUT_START = "blackout"
_BLACKOUT_END = "done"


def _num(value: Any) -> float | None:
    """A finite float from a JSON value, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if f == f and abs(f) != float("inf") else None


def _derived_rate(times: Sequence[float], counters: Sequence[float | None]
                  ) -> tuple[list[float], list[float]]:
    """Bytes per second between successive readings of a cumulative counter, plotted at the
    end of each interval. Readings closer than ``min_dt`` to the previous one used are
    skipped (progress events a millisecond apart would give meaningless spikes)."""
    kept = [(t, c) for t, c in zip(times, counters, strict=True) if c is not None]
    if len(kept) < 2:
        return [], []
    min_dt = max(0.05, (kept[-1][0] - kept[0][0]) / 200)
    ts: list[float] = []
    rates: list[float] = []
    last_t, last_c = kept[0]
    for t, c in kept[1:]:
        dt = t - last_t
        if dt < min_dt:
            continue
        ts.append(t)
        rates.append(max(c - last_c, 0.0) / dt)
        last_t, last_c = t, c
    return ts, rates


def timeline_series(report: dict[str, Any]) -> dict[str, tuple[list[float], list[float]]]:
    """The series the plot draws, by name: (times in s, values). Rates in bytes/s, throttle
    as a fraction 0–1, predicted downtime in ms."""
    progress = [e for e in report.get("timeline") or [] if e.get("event") == "progress"
                and _num(e.get("t")) is not None]
    progress.sort(key=lambda e: float(e["t"]))
    t = [float(e["t"]) for e in progress]

    def direct(key: str) -> tuple[list[float], list[float]]:
        pts = [(ti, _num(e.get(key))) for ti, e in zip(t, progress, strict=True)]
        kept = [(ti, v) for ti, v in pts if v is not None]
        return [p[0] for p in kept], [p[1] for p in kept]

    def nested(group: str, key: str) -> list[float | None]:
        out: list[float | None] = []
        for e in progress:
            sub = e.get(group)
            out.append(_num(sub.get(key)) if isinstance(sub, dict) else None)
        return out

    series = {
        "memory_rate_Bps": direct("memory_rate_Bps"),
        "dirty_rate_Bps": direct("dirty_rate_Bps"),
        "throttle": direct("throttle"),
        "predicted_downtime_ms": direct("predicted_downtime_ms"),
        "disk_bulk_Bps": _derived_rate(t, nested("disk", "bulk_data_bytes")),
        "disk_mirror_Bps": _derived_rate(t, nested("disk", "mirror_bytes_sent")),
        "wire_Bps": _derived_rate(t, nested("session", "wire_bytes_out")),
    }
    return {k: v for k, v in series.items() if v[0]}


def _phases(report: dict[str, Any]) -> list[tuple[float, str]]:
    out = []
    for e in report.get("timeline") or []:
        t = _num(e.get("t"))
        if e.get("event") == "phase" and t is not None:
            out.append((t, str(e.get("phase", "?"))))
    return sorted(out)


def _blackout(phases: list[tuple[float, str]]) -> tuple[float, float] | None:
    start = next((t for t, p in phases if p == _BLACKOUT_START), None)
    if start is None:
        return None
    end = next((t for t, p in phases if p == _BLACKOUT_END and t >= start), None)
    if end is None:
        end = max(t for t, _ in phases)
    return start, max(end, start)


def plot_timeline(report: dict[str, Any], path: Path) -> None:
    """Write the timeline of ``report`` (a final report with its ``timeline``) to ``path``
    as a PNG. A report without progress events still gives a (mostly empty) figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = timeline_series(report)
    phases = _phases(report)
    fig, (ax, ax_pd) = plt.subplots(2, 1, figsize=(11, 7), sharex=True,
                                    gridspec_kw={"height_ratios": [3, 1]})
    try:
        styles = [
            ("wire_Bps", "wire (all channels)", "0.55", "-"),
            ("memory_rate_Bps", "memory rate", "tab:blue", "-"),
            ("dirty_rate_Bps", "dirty rate", "tab:red", "-"),
            ("disk_bulk_Bps", "disk bulk (data sent)", "tab:green", "-"),
            ("disk_mirror_Bps", "disk mirror", "tab:olive", "--"),
        ]
        for key, label, color, ls in styles:
            if key in series:
                xs, ys = series[key]
                ax.plot(xs, [y / MB for y in ys], ls, color=color, label=label,
                        marker="." if len(xs) < 30 else None, linewidth=1.4)
        ax.set_ylabel("MB/s")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)

        ax_th = ax.twinx()
        if "throttle" in series:
            xs, ys = series["throttle"]
            ax_th.step(xs, ys, where="post", color="tab:purple", linewidth=1.2,
                       label="SDPS throttle")
        ax_th.set_ylim(0, 1.05)
        ax_th.set_ylabel("throttle (fraction of vCPU stalled)", color="tab:purple")

        if "predicted_downtime_ms" in series:
            xs, ys = series["predicted_downtime_ms"]
            # before the first estimate the predictor says "never" (a huge number)
            clipped = any(y > PREDICTED_CAP_MS for y in ys)
            ax_pd.plot(xs, [min(y, PREDICTED_CAP_MS) for y in ys], ".-", color="tab:orange",
                       label="predicted downtime"
                       + (f" (shown ≤ {PREDICTED_CAP_MS / 1000:g} s)" if clipped else ""))
            ax_pd.set_yscale("log")
        budget = _num((report.get("options") or {}).get("max_downtime_s"))
        if budget is not None:
            ax_pd.axhline(budget * 1000, color="tab:orange", linestyle=":", linewidth=1,
                          label=f"budget {budget * 1000:.0f} ms")
        ax_pd.set_ylabel("ms")
        ax_pd.set_xlabel("time since start (s)")
        ax_pd.grid(True, alpha=0.3)

        for t, name in phases:
            for a in (ax, ax_pd):
                a.axvline(t, color="0.3", linestyle="--", linewidth=0.7)
            ax.annotate(name, xy=(t, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(2, -2), textcoords="offset points", rotation=90,
                        va="top", ha="left", fontsize=7, color="0.3")

        window = _blackout(phases)
        downtime = _num(report.get("downtime_ms"))
        if window is not None:
            start, end = window
            # the shaded span is at least wide enough to see on a long timeline
            span = max(t for t, _ in phases) - min(t for t, _ in phases) if phases else 0
            end = max(end, start + span * 0.004)
            for a in (ax, ax_pd):
                a.axvspan(start, end, color="black", alpha=0.15, linewidth=0)
            text = (f"downtime {downtime:.0f} ms" if downtime is not None else "blackout")
            client = _num(report.get("client_downtime_ms"))
            if client is not None:
                text += f"\n(client {client:.0f} ms)"
            ax.annotate(text, xy=((start + end) / 2, 0.55), xycoords=("data", "axes fraction"),
                        xytext=(-40, 0), textcoords="offset points", ha="right", va="center",
                        fontsize=9, bbox={"boxstyle": "round", "fc": "white", "alpha": 0.8},
                        arrowprops={"arrowstyle": "->", "color": "0.2"})

        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax_th.get_legend_handles_labels()
        if h1 or h2:
            ax.legend(h1 + h2, l1 + l2, loc="best", fontsize=8, framealpha=0.85)
        if ax_pd.get_legend_handles_labels()[0]:
            ax_pd.legend(loc="upper right", fontsize=8)
        ax.set_title(_title(report), fontsize=10)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=110)
    finally:
        plt.close(fig)


def _title(report: dict[str, Any]) -> str:
    parts = [f"xmig migration: {report.get('status', '?')}"]
    link = report.get("link") or {}
    rate = _num(link.get("rate_bps"))
    if rate is not None:
        rtt = (_num(link.get("delay_fwd_s")) or 0) + (_num(link.get("delay_rev_s")) or 0)
        parts.append(f"link {rate / 1e6:g} Mbit/s × RTT {rtt * 1000:g} ms")
    total = _num(report.get("total_s"))
    if total is not None:
        parts.append(f"total {total:.1f} s")
    rounds = report.get("rounds")
    if isinstance(rounds, int):
        parts.append(f"{rounds} rounds")
    return ", ".join(parts)
