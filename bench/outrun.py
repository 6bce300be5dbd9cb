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

Then the QEMU test guest (128 MiB RAM, 32 MiB disk, ``memdisk``: 32 MiB of memory dirtied
at half the link's rate) with its disk written at 2× and 5× the link (``qemu2``, ``qemu5``):
xmig with SDPS on (the vCPU quota and the NBD acknowledgement pace QEMU's write-blocking
mirror waits on), then QEMU's own migration as libvirt drives it (``bench/vs_qemu.py``),
its mirror write-blocking and in the background, under ``qemu_native``. QEMU cells have no
UDP client (no ``client_gap`` target) and no progress-based penalty; their guest's disk
rate is its own count of records written (``guest_disk_MiBps``). Their acknowledgement
delays count from QEMU's mirror job being ready; before it (the job's own 1 MiB copy writes,
many in flight, held by the mirror's bound) they are ``copy_max_ack_delay_ms`` and
``copy_p99_ack_delay_ms``. ``--no-qemu`` skips them,
``--no-native`` runs their xmig side only.
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
from vs_qemu import run_side

from xmig.guest.qemu.migrate import QemuMigrationOptions
from xmig.guest.sim import SimConfig
from xmig.guest.sim.source import MigrationOptions
from xmig.harness.localrun import LocalRun, run_local
from xmig.harness.qemurun import QemuRun, default_build_dir
from xmig.netem import LinkSpec
from xmig.units import argtype, parse_duration, parse_size

MiB = 1 << 20
LINK_BPS = 100_000_000
RTT_S = 0.05
DISK_X = (0.5, 1, 2, 5, 10)
QEMU_DISK_X = (2, 5)
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


def qemu_run(disk_x: float, args: argparse.Namespace) -> QemuRun:
    """The QEMU test guest (128 MiB RAM, 32 MiB disk, ``memdisk``) writing its disk at
    ``disk_x`` × the link and dirtying 32 MiB of memory at half the link's rate."""
    link_MiBps = LINK_BPS / 8 / MiB
    return QemuRun(
        link=LinkSpec.symmetric(rate_bps=LINK_BPS, rtt_s=RTT_S, seed=args.seed),
        build_dir=default_build_dir(), ram_mb=128, disk_bytes=32 * MiB,
        params={"mem_mb": 32, "mem_rate": round(0.5 * link_MiBps, 2),
                "disk_rate": round(disk_x * link_MiBps, 2)},
        options=QemuMigrationOptions(downtime_limit_ms=round(args.max_downtime * 1000),
                                     timeout_s=args.timeout, sdps=True))


async def run_qemu_cell(disk_x: float, args: argparse.Namespace) -> dict[str, Any]:
    """One QEMU cell: xmig (SDPS on), then QEMU's own migration with its mirror
    write-blocking and in the background (auto-converge, max-bandwidth the link's)."""
    run = qemu_run(disk_x, args)
    cell: dict[str, Any] = {"backend": "qemu", "disk_x": disk_x, "mem_x": 0.5,
                            "budget_ms": round(args.max_downtime * 1e3, 1)}
    xmig = await run_side("xmig", run, _vs_args(args, "background"))
    disk = xmig.get("disk") or {}
    cell.update({k: xmig.get(k) for k in ("status", "downtime_ms", "total_s", "verified",
                                          "error", "guest_disk_MiBps")})
    cell.update(forecast=xmig.get("forecast"), sdps_max_throttle=xmig.get("sdps_max_throttle"),
                max_ack_delay_ms=_ms(disk.get("ack_delay_max_s")),
                p99_ack_delay_ms=_ms(disk.get("ack_delay_p99_s")),
                # before QEMU's mirror job is ready: its own 1 MiB copy writes, held by the
                # bound (guest writes among them)
                copy_max_ack_delay_ms=_ms(disk.get("copy_ack_delay_max_s")),
                copy_p99_ack_delay_ms=_ms(disk.get("copy_ack_delay_p99_s")),
                guest_disk_rate_ratio=_ratio_to_link(xmig.get("guest_disk_MiBps")),
                workload_penalty=None, client_max_gap_outside_blackout_ms=None)
    cell["targets"] = {k: v for k, v in targets(cell).items() if k != "client_gap"}
    cell["qemu_native"] = {}
    for mode in () if args.no_native else ("write-blocking", "background"):
        native = await run_side("qemu", run, _vs_args(args, mode))
        cell["qemu_native"][mode] = {
            **{k: native.get(k) for k in ("status", "converged", "downtime_ms", "total_s",
                                          "verified", "verify_error", "disk_records_checked",
                                          "disk_records_bad", "guest_disk_MiBps",
                                          "max_throttle_pct", "stuck_in", "error")},
            "guest_disk_rate_ratio": _ratio_to_link(native.get("guest_disk_MiBps"))}
    return cell


def _vs_args(args: argparse.Namespace, copy_mode: str) -> argparse.Namespace:
    """What bench/vs_qemu.py's run_side reads: QEMU's own migration as libvirt drives it."""
    return argparse.Namespace(downtime_limit_ms=round(args.max_downtime * 1000),
                              max_bandwidth="link", timeout=args.timeout, copy_mode=copy_mode)


def _ms(seconds: Any) -> float | None:
    return None if seconds is None else round(float(seconds) * 1000, 1)


def _ratio_to_link(mib_per_s: Any) -> float | None:
    return None if mib_per_s is None else round(float(mib_per_s) * MiB / (LINK_BPS / 8), 3)


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
    for disk_x in () if args.no_qemu else QEMU_DISK_X:
        if args.only and f"qemu{disk_x:g}" not in args.only:
            continue
        cell = await run_qemu_cell(disk_x, args)
        out["cells"].append(cell)
        print(f"outrun: {json.dumps(cell)}", file=sys.stderr, flush=True)
    cells = out["cells"]
    names = {k for c in cells for k in c["targets"]}
    out["targets_met"] = {k: sum(bool(c["targets"].get(k)) for c in cells) for k in names}
    out["targets_of"] = {k: sum(k in c["targets"] for c in cells) for k in names}
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
    ap.add_argument("--only", action="append", metavar="CELL",
                    help="run only this cell (5x2: the reference guest's disk 5×, memory 2× "
                    "the link; qemu2: the QEMU guest's disk 2×); repeatable")
    ap.add_argument("--no-qemu", action="store_true", help="skip the QEMU cells")
    ap.add_argument("--no-native", action="store_true",
                    help="QEMU cells: xmig only, not QEMU's own migration beside it")
    args = ap.parse_args(argv)
    size = 64 * MiB if args.quick else 256 * MiB
    args.ram = args.ram or size
    args.disk = args.disk or size
    return args


if __name__ == "__main__":
    ARGS = parse_args()
    RESULT = asyncio.run(main(ARGS))
    print(json.dumps(RESULT, indent=None if ARGS.json else 1))
