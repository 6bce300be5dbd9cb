"""Guests that outrun the link (issue 10): the convergence controller, memory and disk together.

    python bench/outrun.py --json                 # 256 MiB RAM + 256 MiB disk, 10 cells
    python bench/outrun.py --json --quick         # 64 MiB + 64 MiB, 4 cells

The reference guest (``oltp``: a key-value table in RAM, its disk written at a set rate) is
migrated over 100 Mbit/s × 50 ms on the WAN emulator with its disk written at {0.5, 1, 2, 5,
10} × the link's rate and its memory written at {0.5, 2} × the link's rate. Each cell gives
``status, downtime_ms, budget_ms, forecast`` (what the model said from the warm-up's rates,
before the start), ``max_ack_delay_ms, p99_ack_delay_ms`` (what mirroring added to the
guest's disk-write acknowledgements), ``guest_disk_rate_ratio`` (the guest's disk writes over
the pre-copy ÷ the link), ``workload_penalty, client_max_gap_outside_blackout_ms,
sdps_max_throttle, total_s`` and the targets met: every cell converges; downtime ≤ budget +
1 RTT; max ack delay ≤ 1000 ms and p99 ≤ 100 ms; the client's longest gap outside the
blackout ≤ max(50 ms, the downtime); the forecast total within ±25 % of the actual. Inputs
are seeded (``--seed``); versions are recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from longhaul import versions

from xmig.guest.sim import SimConfig
from xmig.guest.sim.source import MigrationOptions
from xmig.harness.localrun import LocalRun, run_local
from xmig.netem import LinkSpec
from xmig.units import argtype, parse_duration, parse_size

MiB = 1 << 20
LINK_BPS = 100_000_000
RTT_S = 0.05
DISK_X = (0.5, 1, 2, 5, 10)
MEM_X = (0.5, 2)
SOCKET = "nbd+unix:///?socket=/set-by-run_local"
KEYS = ("status", "downtime_ms", "forecast", "max_ack_delay_ms", "p99_ack_delay_ms",
        "workload_penalty", "client_max_gap_outside_blackout_ms", "sdps_max_throttle",
        "total_s", "client_downtime_ms", "verified", "lost_acknowledged_writes", "error")


def targets(cell: dict[str, Any]) -> dict[str, bool]:
    """Issue 10's targets, met or not, for one cell."""
    done = cell.get("status") == "done"
    down, budget = cell.get("downtime_ms"), cell["budget_ms"]
    forecast_total = (cell.get("forecast") or {}).get("total_s")
    total = cell.get("total_s")
    gap = cell.get("client_max_gap_outside_blackout_ms")
    return {
        "converges": done,
        "downtime": done and down is not None and down <= budget + RTT_S * 1e3,
        "max_ack_delay": done and (cell.get("max_ack_delay_ms") or 0) <= 1000,
        "p99_ack_delay": done and (cell.get("p99_ack_delay_ms") or 0) <= 100,
        "client_gap": done and gap is not None and gap <= max(50.0, down or 0.0),
        "forecast_total": bool(done and forecast_total and total
                               and abs(forecast_total - total) <= 0.25 * total),
    }


async def run_cell(disk_x: float, mem_x: float, args: argparse.Namespace) -> dict[str, Any]:
    link_Bps = LINK_BPS / 8
    guest = SimConfig(ram_bytes=args.ram, workload="oltp", rate_Bps=mem_x * link_Bps,
                      disk_rate_Bps=disk_x * link_Bps, seed=args.seed, disk_url=SOCKET,
                      hotset_bytes=min(64 * MiB, args.ram // 4))
    run = LocalRun(guest=guest, link=LinkSpec.symmetric(rate_bps=LINK_BPS, rtt_s=RTT_S,
                                                        seed=args.seed),
                   options=MigrationOptions(max_downtime_s=args.max_downtime,
                                            timeout_s=args.timeout),
                   disk_bytes=args.disk, warmup_s=args.warmup)
    cell: dict[str, Any] = {"disk_x": disk_x, "mem_x": mem_x,
                            "budget_ms": round(args.max_downtime * 1e3, 1)}
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="xmig-outrun-") as tmp:
            async with asyncio.timeout(args.cell_timeout):
                report = (await run_local(run, workdir=Path(tmp))).to_json()
    except Exception as err:  # one failed cell must not lose the others
        report = {"status": "error", "error": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc(limit=6)}
    cell.update({k: report.get(k) for k in KEYS})
    rate = report.get("guest_disk_write_Bps")
    cell["guest_disk_rate_ratio"] = None if rate is None else round(rate / link_Bps, 3)
    cell["wall_s"] = round(time.monotonic() - t0, 1)
    cell["targets"] = targets(cell)
    return cell


async def main(args: argparse.Namespace) -> dict[str, Any]:
    disk_xs, mem_xs = ((1, 5), MEM_X) if args.quick else (DISK_X, MEM_X)
    out: dict[str, Any] = {
        "bench": "outrun", "seed": args.seed, "link": {"rate_bps": LINK_BPS, "rtt_s": RTT_S},
        "ram_bytes": args.ram, "disk_bytes": args.disk, "versions": versions(), "cells": []}
    for mem_x in mem_xs:
        for disk_x in disk_xs:
            if args.only and f"{disk_x:g}x{mem_x:g}" not in args.only:
                continue
            cell = await run_cell(disk_x, mem_x, args)
            out["cells"].append(cell)
            print(f"outrun: {json.dumps(cell)}", file=sys.stderr, flush=True)
    cells = out["cells"]
    out["targets_met"] = {k: sum(c["targets"][k] for c in cells) for k in cells[0]["targets"]}
    out["cells_total"] = len(cells)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true", help="64 MiB + 64 MiB, 4 cells")
    ap.add_argument("--ram", type=argtype(parse_size), default=None)
    ap.add_argument("--disk", type=argtype(parse_size), default=None)
    ap.add_argument("--max-downtime", type=argtype(parse_duration), default=0.3)
    ap.add_argument("--timeout", type=argtype(parse_duration), default=300.0)
    ap.add_argument("--cell-timeout", type=float, default=600.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", action="append", metavar="DISKxMEM",
                    help="run only this cell (e.g. 5x2: disk 5×, memory 2× the link); "
                    "repeatable")
    args = ap.parse_args(argv)
    size = 64 * MiB if args.quick else 256 * MiB
    args.ram = args.ram or size
    args.disk = args.disk or size
    return args


if __name__ == "__main__":
    ARGS = parse_args()
    RESULT = asyncio.run(main(ARGS))
    print(json.dumps(RESULT, indent=None if ARGS.json else 1))
