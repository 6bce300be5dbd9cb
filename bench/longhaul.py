"""Long-haul benchmark: XvMotion's evaluation (memory + disk over a long, thin link), on the
WAN emulator.

    python bench/longhaul.py --json --plot out/          # full: 1 GiB guest, 2 GiB disk
    python bench/longhaul.py --json --quick --plot out/  # 256 MiB / 256 MiB, fewer points

Each point migrates a fresh reference guest (``xmig.harness.localrun``) and records the measures of
DESIGN.md ("Measures") as the final report gives them, with the targets of issue 3 §6:
downtime ≤ 1.5 × RTT + 100 ms, workload penalty ≤ 0.10, link utilization ≥ 0.9. Two more
points run a guest dirtying memory at 2× the link's rate, with SDPS on (must converge) and
off with a timeout (must abort, source still running). ``--plot DIR`` writes one timeline
PNG per point (``xmig.harness.plot``). Inputs are seeded (``--seed``); versions are recorded.
The printed JSON leaves out each point's ``timeline`` (the plot shows it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import ssl
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmig import __version__
from xmig.guest.sim import SimConfig
from xmig.guest.sim.source import MigrationOptions
from xmig.harness.localrun import LocalRun, run_local
from xmig.netem import LinkSpec

GUEST_NICE = -10
MiB = 1 << 20
GiB = 1 << 30
MBIT = 1_000_000
GBIT = 1_000_000_000
SOCKET = "nbd+unix:///?socket=/set-by-run_local"  # run_local replaces it

#: the measures copied from each report into the printed point
MEASURES = ("status", "downtime_ms", "client_downtime_ms", "total_s", "workload_penalty",
            "wire_ratio", "link_utilization", "sdps_max_throttle", "rounds", "verified",
            "wire_bytes", "guest_bytes", "acknowledged_writes", "lost_acknowledged_writes",
            "client_puts_acknowledged", "client_puts_lost", "client_gap_from_pause_ms",
            "bulk_pending_s", "error", "source_running")

PENALTY_TARGET = 0.10
UTILIZATION_TARGET = 0.9


@dataclass(frozen=True)
class Point:
    """One measured migration."""

    name: str
    rate_bps: int
    rtt_s: float
    workload: str
    rate_Bps: float
    disk_rate_Bps: float = 0.0
    sdps: str = "on"
    timeout_s: float = 300.0
    expect: str = "done"  #: "done", or "aborted" for the SDPS-off run
    extra: dict[str, Any] = field(default_factory=dict)


def points(quick: bool, oltp_rate: float, disk_rate: float) -> list[Point]:
    """The points of the benchmark: oltp across the XvMotion links, then the outrunner."""
    if quick:
        links = [(GBIT, 0.001), (GBIT, 0.1), (100 * MBIT, 0.1)]
    else:
        links = [(GBIT, 0.001), (GBIT, 0.05), (GBIT, 0.1), (GBIT, 0.2), (100 * MBIT, 0.1)]
    out = [Point(name=f"oltp-{rate // MBIT}mbit-{rtt * 1000:g}ms", rate_bps=rate, rtt_s=rtt,
                 workload="oltp", rate_Bps=oltp_rate, disk_rate_Bps=disk_rate)
           for rate, rtt in links]
    # a guest rewriting whole random pages at 2x what the link drains: SDPS on and off
    link, rtt = 100 * MBIT, 0.05
    dirty = 2 * link / 8
    off_timeout = 20.0 if quick else 60.0
    out.append(Point(name="outrun-2x-sdps-on", rate_bps=link, rtt_s=rtt, workload="uniform",
                     rate_Bps=dirty, sdps="on", extra={"write_size": 4096}))
    out.append(Point(name="outrun-2x-sdps-off", rate_bps=link, rtt_s=rtt, workload="uniform",
                     rate_Bps=dirty, sdps="off", timeout_s=off_timeout, expect="aborted",
                     extra={"write_size": 4096}))
    return out


def targets(point: Point, report: dict[str, Any], verify: bool = True) -> dict[str, Any]:
    """Each target with its limit, the measured value and pass/fail (None: not measured).
    With ``verify`` off the report's ``verified`` is None (no digests taken), accepted."""
    out: dict[str, Any] = {}
    if point.expect == "aborted":
        ok = report.get("status") == "aborted" and bool(report.get("source_running"))
        out["aborts_source_running"] = {"pass": ok}
        out["no_lost_put"] = {"pass": report.get("client_puts_lost") == 0}
        out["pass"] = all(v["pass"] for v in out.values())
        return out
    limit_ms = 1.5 * point.rtt_s * 1000 + 100

    def check(name: str, value: Any, limit: float, le: bool) -> None:
        ok = None if value is None else (value <= limit if le else value >= limit)
        out[name] = {"limit": round(limit, 3), "value": value, "pass": ok}

    check("downtime_ms", report.get("downtime_ms"), limit_ms, True)
    if point.workload == "oltp":
        check("workload_penalty", report.get("workload_penalty"), PENALTY_TARGET, True)
    else:  # a guest dirtying at 2x the link must be slowed by half or more: that is SDPS
        out["workload_penalty"] = {"value": report.get("workload_penalty"),
                                   "pass": None, "applies": False}
    check("link_utilization", report.get("link_utilization"), UTILIZATION_TARGET, False)
    out["completed_verified"] = {"pass": report.get("status") == "done"
                                 and report.get("verified") is (True if verify else None)
                                 and report.get("lost_acknowledged_writes") == 0
                                 and report.get("client_puts_lost") == 0}
    out["pass"] = all(v["pass"] is True or v.get("applies") is False for v in out.values())
    return out


def budget_s(point: Point, max_downtime: float | None) -> float:
    """The downtime budget given to the migration: ``--max-downtime``, or by default the
    point's target, 1.5 × RTT + 100 ms (above the commit's own 1.5 × RTT floor; xmig's
    300 ms default would let the 100 and 50 ms points stop over their targets)."""
    if max_downtime is not None:
        return max_downtime
    return 1.5 * point.rtt_s + 0.1


def versions() -> dict[str, str]:
    out = {"xmig": __version__, "python": platform.python_version(),
           "openssl": ssl.OPENSSL_VERSION, "kernel": platform.release(),
           "machine": platform.machine(), "cpus": str(os.cpu_count())}
    try:
        import matplotlib

        out["matplotlib"] = matplotlib.__version__
    except ImportError:
        pass
    return out


async def run_point(point: Point, args: argparse.Namespace, seed: int, workdir: Path
                    ) -> dict[str, Any]:
    guest = SimConfig(ram_bytes=args.ram, workload=point.workload, rate_Bps=point.rate_Bps,
                      disk_rate_Bps=point.disk_rate_Bps, seed=seed, disk_url=SOCKET,
                      hotset_bytes=min(64 * MiB, args.ram // 4), nice=args.guest_nice,
                      **point.extra)
    link = LinkSpec.symmetric(rate_bps=point.rate_bps, rtt_s=point.rtt_s, seed=seed)
    options = MigrationOptions(max_downtime_s=budget_s(point, args.max_downtime),
                               timeout_s=point.timeout_s,
                               sdps=point.sdps, verify=args.verify)
    run = LocalRun(guest=guest, link=link, options=options,
                   disk_bytes=args.disk if point.workload == "oltp" else min(args.disk, 64 * MiB),
                   warmup_s=args.warmup, streams=args.streams)
    t0 = time.monotonic()
    events: list[dict[str, Any]] = []  # what it was doing if it fails or hangs
    try:
        async with asyncio.timeout(args.point_timeout):
            report = (await run_local(run, workdir=workdir, on_event=events.append)).to_json()
    except TimeoutError:
        report = {"status": "error", "error": f"no result within {time.monotonic() - t0:.0f} s"
                  " (--point-timeout)", "last_events": _brief(events[-4:])}
    except Exception as err:  # one failed point must not lose the others
        report = {"status": "error", "error": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc(limit=8), "last_events": _brief(events[-4:])}
    report["wall_s"] = round(time.monotonic() - t0, 1)
    return report


def _brief(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events without their bulky nested counters."""
    return [{k: v for k, v in e.items() if not isinstance(v, dict | list)} for e in events]


def summarize(point: Point, report: dict[str, Any], seed: int, verify: bool,
              max_downtime: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": point.name,
                           "link": {"rate_bps": point.rate_bps, "rtt_ms": point.rtt_s * 1000},
                           "workload": point.workload, "rate_Bps": point.rate_Bps,
                           "disk_rate_Bps": point.disk_rate_Bps, "sdps": point.sdps,
                           "timeout_s": point.timeout_s, "expect": point.expect, "seed": seed,
                           "max_downtime_s": round(budget_s(point, max_downtime), 4)}
    out.update({k: report[k] for k in MEASURES if k in report})
    out["wall_s"] = report.get("wall_s")
    out["blackout_steps_ms"] = blackout_steps(report.get("timeline") or [])
    out["downtime_parts_ms"] = report.get("downtime_parts_ms")
    for key in ("traceback", "last_events"):
        if key in report:
            out[key] = report[key]
    out["targets"] = targets(point, report, verify)
    return out


def blackout_steps(timeline: list[dict[str, Any]]) -> dict[str, float]:
    """Where the blackout went: ms from the pause to each step the source saw."""
    paused = next((e["t"] for e in timeline if e.get("note") == "guest paused"), None)
    if paused is None:
        return {}
    steps = {}
    for e in timeline:
        if e["t"] >= paused and e.get("event") in ("blackout", "phase"):
            name = e.get("step") or e.get("note") or e.get("phase")
            steps[str(name)] = round((e["t"] - paused) * 1000, 1)
    return steps


def table(result: dict[str, Any]) -> str:
    """A plain-text summary table of the points."""
    cols = ("name", "status", "downtime_ms", "client_downtime_ms", "total_s",
            "workload_penalty", "wire_ratio", "link_utilization", "sdps_max_throttle",
            "rounds", "verified", "pass")
    heads = ("point", "status", "down ms", "client ms", "total s", "penalty", "wire",
             "util", "throttle", "rounds", "verified", "targets")
    rows: list[tuple[str, ...]] = [heads]
    for p in result["points"]:
        row = []
        for c in cols:
            v = p["targets"]["pass"] if c == "pass" else p.get(c)
            if c == "pass" and not v:
                failed = [k for k, t in p["targets"].items() if k != "pass"
                          and t.get("pass") is not True and t.get("applies") is not False]
                v = "FAIL " + ",".join(failed)
            row.append("-" if v is None else str(v))
        rows.append(tuple(row))
    widths = [max(len(r[i]) for r in rows) for i in range(len(heads))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    # seeds by position in the whole list, so --only reruns a point identically
    pts = [(args.seed + i, p) for i, p in enumerate(points(args.quick, args.oltp_rate,
                                                           args.disk_rate))]
    if args.only:
        pts = [(seed, p) for seed, p in pts if any(s in p.name for s in args.only)]
    result: dict[str, Any] = {
        "benchmark": "longhaul", "quick": args.quick, "seed": args.seed,
        "guest": {"ram_bytes": args.ram, "disk_bytes": args.disk,
                  "oltp_rate_Bps": args.oltp_rate, "oltp_disk_rate_Bps": args.disk_rate},
        "max_downtime_s": args.max_downtime or "1.5 * rtt + 0.1", "verify": args.verify,
        "streams": args.streams, "warmup_s": args.warmup,
        "targets": {"downtime_ms": "<= 1.5 * rtt_ms + 100", "workload_penalty":
                    f"<= {PENALTY_TARGET}", "link_utilization": f">= {UTILIZATION_TARGET}"},
        "versions": versions(), "points": []}
    if args.plot:
        args.plot.mkdir(parents=True, exist_ok=True)
    for seed, point in pts:
        print(f"[longhaul] {point.name} …", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="xmig-longhaul-") as tmp:
            report = await run_point(point, args, seed, Path(tmp))
        summary = summarize(point, report, seed, args.verify, args.max_downtime)
        if args.plot and report.get("timeline") is not None:
            from xmig.harness.plot import plot_timeline

            png = args.plot / f"{point.name}.png"
            plot_timeline(report, png)
            summary["plot"] = str(png)
        result["points"].append(summary)
        print(f"[longhaul] {point.name}: {report.get('status')} "
              f"downtime {report.get('downtime_ms')} ms, total {report.get('total_s')} s, "
              f"wall {report.get('wall_s')} s, targets "
              f"{'pass' if summary['targets']['pass'] else 'FAIL'}",
              file=sys.stderr, flush=True)
        print(json.dumps(summary), file=sys.stderr, flush=True)  # kept if a later point hangs
    result["all_pass"] = all(p["targets"]["pass"] for p in result["points"])
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from xmig.units import argtype, parse_byte_rate, parse_duration, parse_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--plot", type=Path, default=None, metavar="DIR",
                    help="write one timeline PNG per point into DIR")
    ap.add_argument("--guest-nice", type=int, default=GUEST_NICE,
                    help="the reference guest's nice value (default %(default)s: it stands "
                    "for a VM's own vCPU cores; this box runs guest, both agents and the "
                    "emulator on 2 cores; 0 lets the migration take the guest's CPU)")
    ap.add_argument("--quick", action="store_true",
                    help="256 MiB guest and disk, three links plus the SDPS pair")
    ap.add_argument("--ram", type=argtype(parse_size), default=None,
                    help="guest RAM (default 1GiB, quick 256MiB)")
    ap.add_argument("--disk", type=argtype(parse_size), default=None,
                    help="guest disk (default 2GiB, quick 256MiB)")
    ap.add_argument("--oltp-rate", type=argtype(parse_byte_rate), default="20MB/s",
                    help="oltp page-write rate (default %(default)s)")
    ap.add_argument("--disk-rate", type=argtype(parse_byte_rate), default="4MB/s",
                    help="oltp disk-write rate (default %(default)s)")
    ap.add_argument("--max-downtime", default="auto",
                    type=argtype(lambda t: t if t == "auto" else parse_duration(t)),
                    help="downtime budget; default auto: max(300ms, the point's target "
                         "1.5 x RTT + 100ms)")
    ap.add_argument("--warmup", type=float, default=1.0,
                    help="seconds the guest runs before migrating (its rate before)")
    ap.add_argument("--no-verify", dest="verify", action="store_false",
                    help="skip the memory and disk digests in the blackout (they add to the "
                         "downtime); only the device state is then compared")
    ap.add_argument("--point-timeout", type=float, default=900.0,
                    help="wall seconds after which a point counts as hung and the next one "
                         "runs (default 900; keep it above the migration timeouts)")
    ap.add_argument("--streams", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", action="append", default=[], metavar="SUBSTR",
                    help="run only the points whose name contains SUBSTR (repeatable)")
    args = ap.parse_args(argv)
    args.ram = args.ram or parse_size("256MiB" if args.quick else "1GiB")
    args.disk = args.disk or parse_size("256MiB" if args.quick else "2GiB")
    if args.max_downtime == "auto":
        args.max_downtime = None
    return args


if __name__ == "__main__":
    ns = parse_args()
    # stdout carries the one JSON object only: anything else printed meanwhile goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        res = asyncio.run(main(ns))
    if ns.json:
        print(json.dumps(res, indent=1))
        print(table(res), file=sys.stderr)
    else:
        print(table(res))
    sys.exit(0 if res["all_pass"] else 1)
