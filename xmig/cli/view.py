"""What ``xmig migrate`` shows on a terminal: a live table built from the progress events,
and a one-line summary of the final report.

Rates the events do not carry (disk bulk, mirror, all of the wire) are derived from the
byte counters of the progress events over the last second or more. The ETA is given only
where it can be estimated honestly: while the disk bulk copy or memory round 0 runs (what
is left ÷ the rate so far, plus the predicted downtime); once later pre-copy rounds decide
when to stop, it shows "converging".
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from rich.table import Table

MB = 1e6
MiB = 1 << 20
PAGE = 4096
WINDOW_S = 1.0  #: derived rates span at least this much time


def _f(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _mbps(bps: float | None) -> str:
    return "—" if bps is None else f"{bps / MB:.1f} MB/s"


class ProgressView:
    """Folds progress events into what :meth:`render` draws."""

    def __init__(self, title: str, *, budget_s: float | None = None) -> None:
        self.title = title
        self.budget_s = budget_s
        self.phase = "connecting"
        self.note = ""
        self.last: dict[str, Any] = {}
        self.started = time.monotonic()
        #: (t, bulk data bytes, mirror bytes sent, wire bytes out, bulk offset applied)
        self.samples: deque[tuple[float, float, float, float, float]] = deque(maxlen=64)
        self.first: tuple[float, float] | None = None  #: (t, bulk offset) at the first sample

    def update(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if isinstance(event.get("phase"), str):
            self.phase = event["phase"]
        if kind in ("phase", "progress_note") and event.get("note"):
            self.note = str(event["note"])
        elif kind == "blackout":
            self.note = str(event.get("step", ""))
        elif kind in ("connecting", "connected"):
            self.note = f"{kind} {event.get('to') or event.get('peer') or ''}".strip()
        if kind != "progress":
            return
        self.last = event
        disk = event.get("disk") or {}
        session = event.get("session") or {}
        t = _f(event.get("t"))
        sample = (t, _f(disk.get("bulk_data_bytes")), _f(disk.get("mirror_bytes_sent")),
                  _f(session.get("wire_bytes_out")), _f(disk.get("bulk_applied")))
        self.samples.append(sample)
        if self.first is None:
            self.first = (t, sample[4])

    def rates(self) -> dict[str, float | None]:
        """Bytes/s over the last ≥ WINDOW_S: disk bulk, disk mirror, wire out."""
        if len(self.samples) < 2:
            return {"bulk": None, "mirror": None, "wire": None}
        end = self.samples[-1]
        start = next((s for s in reversed(self.samples) if end[0] - s[0] >= WINDOW_S),
                     self.samples[0])
        dt = end[0] - start[0]
        if dt <= 0:
            return {"bulk": None, "mirror": None, "wire": None}
        return {k: max(end[i] - start[i], 0.0) / dt
                for k, i in (("bulk", 1), ("mirror", 2), ("wire", 3))}

    def eta_s(self) -> float | None:
        """Seconds to the switchover, while it can be estimated (see the module doc)."""
        e = self.last
        if not e or self.phase != "brownout":
            return None
        disk = e.get("disk") or {}
        disk_left = 0.0
        if not disk.get("bulk_done") and self.first is not None and self.samples:
            t, applied = self.samples[-1][0], self.samples[-1][4]
            speed = (applied - self.first[1]) / max(t - self.first[0], 1e-9)
            if speed <= 0:
                return None
            disk_left = (_f(disk.get("size")) - applied) / speed
        memory_left = 0.0
        if e.get("round") == 0:
            rate = _f(e.get("memory_rate_Bps"))
            if rate <= 0:
                return None
            memory_left = _f(e.get("pages_left")) * PAGE * (_f(e.get("wire_ratio")) or 1) / rate
        elif disk.get("bulk_done"):
            return None  # later rounds: the planner decides when it fits
        return max(disk_left, memory_left) + _f(e.get("predicted_downtime_ms")) / 1000

    def render(self) -> Table:
        e = self.last
        disk = e.get("disk") or {}
        session = e.get("session") or {}
        r = self.rates()
        table = Table(title=f"xmig migrate: {self.title}", show_header=False, box=None,
                      title_justify="left")
        table.add_column(style="bold", justify="right")
        table.add_column()
        size = _f(disk.get("size")) or 1
        srtt = session.get("srtt_s")
        budget = f" (budget {self.budget_s * 1000:.0f} ms)" if self.budget_s else ""
        eta = self.eta_s()
        eta_text = {"brownout": "converging" if eta is None else f"~{eta:.0f} s",
                    "done": "done"}.get(self.phase, "—")
        if self.phase in ("blackout", "prepare", "committed"):
            eta_text = "switching over"
        rows = [
            ("phase", f"{self.phase}  {self.note}".rstrip()),
            ("elapsed", f"{time.monotonic() - self.started:.1f} s"),
            ("ETA", eta_text),
            ("round", f"{e.get('round', '—')}  ({e.get('pages_left', 0)} pages to send)"),
            ("memory", f"{_mbps(e.get('memory_rate_Bps'))}  wire ratio "
                       f"{_f(e.get('wire_ratio')):.2f}"),
            ("disk bulk", f"{_mbps(r['bulk'])}  {_f(disk.get('bulk_applied')) / size:.0%} "
                          "applied" + ("  done" if disk.get("bulk_done") else "")),
            ("disk mirror", f"{_mbps(r['mirror'])}  queue "
                            f"{_f(disk.get('mirror_queued_bytes')) / MiB:.1f} MiB"),
            ("wire out", f"{_mbps(r['wire'])}  delivery "
                         f"{_mbps(_f(session.get('delivery_rate_Bps')))}  "
                         f"{session.get('connections', 0)} conns"
                         + (f"  srtt {_f(srtt) * 1000:.0f} ms" if srtt else "")),
            ("dirty rate", _mbps(e.get("dirty_rate_Bps")) if e else "—"),
            ("throttle", f"{_f(e.get('throttle')):.0%}"),
            ("pred. downtime", (f"{_f(e.get('predicted_downtime_ms')):.0f} ms"
                                if e.get("predicted_downtime_ms") is not None else "—")
             + budget),
        ]
        stream = e.get("stream")
        if isinstance(stream, dict):  # a QEMU guest: its own migration stream, not rounds
            sent = stream.get("sent") or {}
            rows[3:5] = [("QEMU stream", f"{_f(sent.get('bytes')) / MiB:.1f} MiB sent  "
                                         f"max-bandwidth {_mbps(e.get('max_bandwidth'))}")]
        for key, value in rows:
            table.add_row(key, value)
        return table


def summary(report: dict[str, Any]) -> str:
    """One line (rich markup) for a finished migration."""
    ok = {True: "[green]verified[/]", False: "[red]NOT VERIFIED[/]",
          None: "[yellow]not verified (--no-verify)[/]"}.get(report.get("verified"), "?")
    down = report.get("downtime_ms")
    return (f"migrated {report.get('name', '')} to {report.get('to', '')} in "
            f"{_f(report.get('total_s')):.1f} s, downtime "
            + ("?" if down is None else f"{down:.0f} ms") + ", SDPS max throttle "
            f"{_f(report.get('sdps_max_throttle')):.0%}, {report.get('rounds')} rounds, "
            f"{report.get('acknowledged_writes')} acknowledged disk writes, "
            f"{report.get('lost_acknowledged_writes')} lost: {ok}")


def plan_summary(plan: dict[str, Any]) -> str:
    """A forecast (``xmig migrate --plan``) in a few lines (rich markup)."""
    guest, probe = plan.get("guest") or {}, plan.get("link_probe") or {}
    lines = [
        f"guest: dirties {_f(guest.get('dirty_Bps')) / 1e6:.1f} MB/s of memory, writes "
        f"{_f(guest.get('disk_write_Bps')) / 1e6:.1f} MB/s to its disk; first pass "
        f"{_f(plan.get('one_time_bytes')) / 1e6:.0f} MB on the wire",
        f"link: {_f(plan.get('link_Bps')) * 8 / 1e6:.1f} Mbit/s, RTT "
        f"{_f(probe.get('rtt_s')) * 1e3:.1f} ms (measured for {_f(probe.get('seconds')):.1f} s"
        + ("" if _f(probe.get('rate_Bps')) <= _f(plan.get('link_Bps')) * 1.001 else
           f": {_f(probe.get('rate_Bps')) * 8 / 1e6:.1f} Mbit/s, capped by --bandwidth") + ")"]
    total, down = plan.get("total_s"), plan.get("downtime_ms")
    if plan.get("converges"):
        digits = 0 if _f(total) >= 10 else 1
        lines.append(
            f"[green]converges[/]: about {_f(total):.{digits}f} s, downtime about "
            f"{_f(down):.0f} ms, throttle up to {_f(plan.get('throttle')):.0%}, penalty "
            f"{_f(plan.get('penalty')):.0%}")
    else:
        lines.append(f"[red]will not converge[/]: {plan.get('reason', '')}")
    return "\n".join(lines)
