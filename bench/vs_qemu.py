"""xmig against QEMU's own migration: same test guest, same workload, same emulated link.

    sudo .venv/bin/python bench/vs_qemu.py --json                 # 1gbit x 100ms, 100mbit x 50ms
    sudo .venv/bin/python bench/vs_qemu.py --json --quick         # 1gbit x 100ms only
    sudo .venv/bin/python bench/vs_qemu.py --link 100mbit:20ms --repeat 3

Per link and run, one side after the other, each with a fresh guest (128 MiB RAM, 32 MiB
disk, ``memdisk`` with QemuRun's default parameters) booted under TCG:

- ``qemu``: QEMU's own migration driven as libvirt drives a non-shared-storage migration
  with auto-converge (:mod:`xmig.guest.qemu.native`): the disk mirrored into the
  destination's NBD export, RAM over QEMU's TCP stream, both QEMUs in the emulator's
  namespaces so QEMU's sockets cross the link themselves.
- ``xmig``: :func:`xmig.harness.qemurun.run_qemu_local` (QEMU's stream and disk on xmig's session,
  xmig's commit protocol).

Both measured the same way (DESIGN.md "Measures", this host's monotonic clock): downtime =
source paused (``pre-switchover``) to destination ``cont`` returned; total = right after the
source guest booted (before the destination QEMU starts) to the destination running;
wire = bytes the emulator forwarded both ways meanwhile. ``ratio_total`` and
``ratio_downtime`` are xmig ÷ QEMU (medians over converged runs; null when a side never
converged). Targets: ratio_total ≤ 0.7, ratio_downtime ≤ 0.5. The link's loss seed is
``--seed`` + run number; nothing else is random.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

from longhaul import versions as base_versions

from xmig.errors import QemuError, XmigError
from xmig.guest.qemu import Progress, QemuConfig, QemuGuest, check_records
from xmig.guest.qemu.image import build_test_guest, guest_cmdline
from xmig.guest.qemu.migrate import QemuMigrationOptions
from xmig.guest.qemu.native import NativeOptions, migrate_native
from xmig.harness.qemurun import (
    BOOT_S,
    REPORT_MS,
    QemuRun,
    default_build_dir,
    link_bytes,
    run_qemu_local,
)
from xmig.netem import LinkSpec, Wan
from xmig.units import argtype, parse_duration, parse_size
from xmig.units import parse_bit_rate as parse_rate

MiB = 1 << 20
LINKS = ("1gbit:100ms", "100mbit:50ms")
QUICK_LINKS = ("1gbit:100ms",)
TARGETS = {"ratio_total": 0.7, "ratio_downtime": 0.5}
KEYS = ("total_s", "downtime_ms", "wire_bytes", "guest_gap_ms", "guest_counter_per_s",
        "guest_disk_MiBps")


# -- side (a): QEMU's own migration ------------------------------------------------------


async def _drain(guest: QemuGuest) -> Progress | None:
    """The newest progress line a stopped guest printed (None: none ever)."""
    with contextlib.suppress(QemuError):
        await guest.wait_for_progress(0.3)
    return guest.history[-1] if guest.history else None


async def run_native(run: QemuRun, options: NativeOptions, workdir: Path) -> dict[str, Any]:
    """Boot the test guest in the link's source namespace and migrate it with QEMU's own
    migration (:func:`migrate_native`); a report with qemurun's keys where they apply."""
    image = await asyncio.to_thread(build_test_guest, run.build_dir)
    src_dir, dst_dir = workdir / "src", workdir / "dst"
    src_dir.mkdir(parents=True, exist_ok=True)
    disk = src_dir / "disk.raw"
    disk.touch()
    os.truncate(disk, run.disk_bytes)
    append = guest_cmdline(run.workload, report_ms=REPORT_MS, **run.params)
    config = QemuConfig(kernel=image.kernel, initrd=image.initrd, disk=disk,
                        ram_mb=run.ram_mb, name="src", append=append)
    with Wan(run.link) as wan:
        async with await QemuGuest.launch(config, src_dir,
                                          popen=functools.partial(wan.popen, "src")) as source:
            first = await source.wait_for_progress(BOOT_S, min_counter=1)
            on_link = link_bytes(wan)
            res = await migrate_native(source, replace(config, name="dst", disk=None),
                                       dst_addr=wan.dst_addr, workdir=dst_dir,
                                       popen=functools.partial(wan.popen, "dst"),
                                       options=options)
            on_link = link_bytes(wan) - on_link
            report: dict[str, Any] = {
                "status": res.status, "converged": res.converged, "error": res.error,
                "total_s": round(res.resumed_at - res.started, 3) if res.converged else None,
                "downtime_ms": (round((res.resumed_at - res.paused_at) * 1000, 1)
                                if res.converged else None),
                "wire_bytes": on_link if res.converged else None,
                "wire_bytes_until_end": on_link,
                "qemu_downtime_ms": res.qemu_info.get("downtime"),
                "qemu_ram": res.qemu_info.get("ram", {}),
                "mirror_ready_s": (round(res.mirror_ready_at - res.started, 3)
                                   if res.mirror_ready_at else None),
                "max_throttle_pct": res.max_throttle_pct,
                "stuck_in": (None if res.converged else "pre-copy" if res.mirror_ready_at
                             else "disk mirror (never READY)"),
                "mirror_job_at_end": res.mirror_job or None,
                "blackout_steps_ms": res.steps_ms,
                "verified": False, "guest_gap_ms": None,
                "source_state": await source.status()}
            if res.destination is not None:
                try:
                    report.update(await _verify(run, source, first, res.destination,
                                                res.image))
                finally:
                    await res.destination.quit()
            return report


async def _verify(run: QemuRun, source: QemuGuest, first: Progress, dest: QemuGuest,
                  image: Path | None) -> dict[str, Any]:
    """qemurun's ``verified``: the serial counter continues and the disk records read back.
    A destination that crashed (QEMU 7.2 TCG loses dirty pages, see ramcheck) is recorded."""
    before = await _drain(source)
    if before is None:
        return {"verified": False, "verify_error": "the source printed no progress"}
    rates = guest_rates(run, _progress(first), _progress(before))
    try:
        after = await dest.wait_for_progress(30)
    except QemuError as err:
        return {"verified": False, "verify_error": f"destination: {err}", **rates}
    continues = after.counter >= before.counter
    records = None
    if image is not None and run.workload in ("disk", "memdisk"):
        area = int(run.params["disk_mb"]) * MiB if "disk_mb" in run.params else None
        records = await asyncio.to_thread(check_records, image, before.disk_seq, area=area)
    return {
        "verified": continues and (records is None or (records.ok and records.checked > 0)),
        "guest_gap_ms": after.up_ms - before.up_ms if continues else None,
        "counter": {"source_last": before.counter, "destination_first": after.counter},
        "disk_records_checked": records.checked if records is not None else None,
        "disk_records_bad": records.bad_count if records is not None else None,
        **rates,
    }


def _progress(p: Progress) -> dict[str, int]:
    return {"counter": p.counter, "up_ms": p.up_ms, "disk_seq": p.disk_seq}


def guest_rates(run: QemuRun, first: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    """The source guest's own pace from its first progress line (migration starts) to its
    last (paused), on its own clock: loop iterations and disk MiB written per second."""
    secs = (last["up_ms"] - first["up_ms"]) / 1000
    if secs <= 0:
        return {}
    bs = int(run.params.get("disk_bs", 4096))
    return {"guest_counter_per_s": round((last["counter"] - first["counter"]) / secs, 1),
            "guest_disk_MiBps": round((last["disk_seq"] - first["disk_seq"]) * bs / MiB / secs,
                                      3)}


# -- side (b): xmig ------------------------------------------------------------------------


async def run_xmig(run: QemuRun, workdir: Path) -> dict[str, Any]:
    """:func:`run_qemu_local`; ``wire_bytes`` becomes the emulator's count (the session's
    own is kept as ``session_wire_bytes``)."""
    events: list[dict[str, Any]] = []
    try:
        report = (await run_qemu_local(run, workdir=workdir, on_event=events.append)).to_json()
    except (XmigError, OSError) as err:
        return {"status": "error", "converged": False, "verified": False,
                "error": f"{type(err).__name__}: {err}", "last_events": _brief(events[-4:])}
    converged = report.get("status") == "done"
    out = {k: report.get(k) for k in ("status", "total_s", "downtime_ms", "verified",
                                      "guest_gap_ms", "qemu_downtime_ms", "counter",
                                      "disk_records_checked", "ram_chunks_repaired",
                                      "qemu_ram", "disk", "stream_bytes",
                                      "source_steps_ms", "destination_steps_ms",
                                      "forecast", "sdps_max_throttle")}
    out.update(converged=converged, wire_bytes=report.get("link_bytes"),
               session_wire_bytes=report.get("wire_bytes"))
    booted = next((e for e in events if e.get("event") == "booted"), None)
    if booted is not None and "up_ms" in booted and report.get("source_last"):
        out.update(guest_rates(run, booted, report["source_last"]))
    return out


def _brief(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if not isinstance(v, dict | list)} for e in events]


# -- the benchmark -------------------------------------------------------------------------


async def run_side(side: str, run: QemuRun, args: argparse.Namespace) -> dict[str, Any]:
    """One side, once, in its own folder, with a hang guard; errors become the report."""
    t0 = time.monotonic()
    native = NativeOptions(downtime_limit_ms=args.downtime_limit_ms,
                           max_bandwidth_Bps=_max_bandwidth(args.max_bandwidth, run.link),
                           timeout_s=args.timeout, copy_mode=args.copy_mode)
    with tempfile.TemporaryDirectory(prefix=f"xmig-vs-{side}-") as tmp:
        try:
            async with asyncio.timeout(args.timeout + 300):
                if side == "qemu":
                    report = await run_native(run, native, Path(tmp))
                else:
                    report = await run_xmig(run, Path(tmp))
        except TimeoutError:
            report = {"status": "error", "converged": False, "verified": False,
                      "error": f"no result within {time.monotonic() - t0:.0f} s"}
        except Exception as err:  # one failed run must not lose the others
            report = {"status": "error", "converged": False, "verified": False,
                      "error": f"{type(err).__name__}: {err}",
                      "traceback": traceback.format_exc(limit=8)}
    report["wall_s"] = round(time.monotonic() - t0, 1)
    return report


def _max_bandwidth(choice: str, link: LinkSpec) -> int | None:
    """QEMU's max-bandwidth for the native side, bytes/s: the link rate, unlimited, a rate."""
    if choice == "unlimited":
        return None
    if choice == "link":
        return None if link.rate_bps is None else link.rate_bps // 8
    return parse_rate(choice) // 8


def summarize_side(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the converged runs; ``converged``/``verified`` hold for every run."""
    done = [r for r in runs if r.get("converged")]
    out: dict[str, Any] = {"converged": bool(runs) and len(done) == len(runs),
                           "converged_runs": len(done),
                           "verified": bool(runs) and all(r.get("verified") for r in runs)}
    for key in KEYS:
        values = [r[key] for r in done if r.get(key) is not None]
        out[key] = round(statistics.median(values), 3) if values else None
    out["runs"] = runs
    return out


def _ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def summarize_link(name: str, link: LinkSpec, qemu: dict[str, Any], xmig: dict[str, Any]
                   ) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "link": link.to_dict(), "qemu": qemu, "xmig": xmig}
    both = qemu["converged_runs"] > 0 and xmig["converged_runs"] > 0
    out["ratio_total"] = _ratio(xmig["total_s"], qemu["total_s"]) if both else None
    out["ratio_downtime"] = _ratio(xmig["downtime_ms"], qemu["downtime_ms"]) if both else None
    out["targets"] = {key: {"limit": limit, "value": out[key],
                            "pass": None if out[key] is None else out[key] <= limit}
                      for key, limit in TARGETS.items()}
    return out


def parse_link(text: str) -> tuple[str, int, float]:
    rate, _, rtt = text.partition(":")
    return text.replace(":", "-"), parse_rate(rate), parse_duration(rtt or "50ms")


def versions() -> dict[str, str]:
    out = base_versions()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                              text=True, timeout=10)
        out["qemu"] = done.stdout.splitlines()[0] if done.stdout else "?"
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    run0 = QemuRun(link=LinkSpec.symmetric(rate_bps=None, rtt_s=0.0), build_dir=args.build,
                   ram_mb=args.ram_mb, disk_bytes=args.disk, workload=args.workload,
                   options=QemuMigrationOptions(downtime_limit_ms=args.downtime_limit_ms,
                                                timeout_s=args.timeout))
    result: dict[str, Any] = {
        "benchmark": "vs_qemu", "seed": args.seed, "repeat": args.repeat,
        "guest": {"ram_mb": run0.ram_mb, "disk_bytes": run0.disk_bytes,
                  "workload": run0.workload, "params": run0.params},
        "downtime_limit_ms": args.downtime_limit_ms, "timeout_s": args.timeout,
        "qemu_side": {"copy_mode": args.copy_mode, "auto_converge": True,
                      "max_bandwidth": args.max_bandwidth},
        "targets": {k: f"<= {v}" for k, v in TARGETS.items()},
        "versions": versions(), "links": []}
    for name, rate, rtt in args.links:
        runs: dict[str, list[dict[str, Any]]] = {"qemu": [], "xmig": []}
        for i in range(args.repeat):
            link = LinkSpec.symmetric(rate_bps=rate, rtt_s=rtt, seed=args.seed + i)
            run = replace(run0, link=link)
            order = ("qemu", "xmig") if i % 2 == 0 else ("xmig", "qemu")
            for side in order:
                if side not in args.sides:
                    continue
                print(f"[vs_qemu] {name} run {i + 1}/{args.repeat}: {side} …",
                      file=sys.stderr, flush=True)
                report = await run_side(side, run, args)
                runs[side].append(report)
                print(f"[vs_qemu] {name} {side}: {report.get('status')} total "
                      f"{report.get('total_s')} s, downtime {report.get('downtime_ms')} ms, "
                      f"wire {report.get('wire_bytes')} B, verified {report.get('verified')}, "
                      f"wall {report.get('wall_s')} s", file=sys.stderr, flush=True)
                print(json.dumps(report), file=sys.stderr, flush=True)
        link = LinkSpec.symmetric(rate_bps=rate, rtt_s=rtt, seed=args.seed)
        result["links"].append(summarize_link(name, link, summarize_side(runs["qemu"]),
                                              summarize_side(runs["xmig"])))
    result["all_pass"] = all(t["pass"] is True for p in result["links"]
                             for t in p["targets"].values())
    return result


def table(result: dict[str, Any]) -> str:
    heads = ("link", "side", "converged", "verified", "total s", "down ms", "wire MB",
             "gap ms", "guest disk MiB/s")
    rows: list[tuple[str, ...]] = [heads]

    def cell(v: Any) -> str:
        return "-" if v is None else str(v)

    for p in result["links"]:
        for side in ("qemu", "xmig"):
            s = p[side]
            wire = None if s["wire_bytes"] is None else round(s["wire_bytes"] / 1e6, 1)
            rows.append((p["name"], side, f"{s['converged_runs']}/{len(s['runs'])}",
                         cell(s["verified"]), cell(s["total_s"]), cell(s["downtime_ms"]),
                         cell(wire), cell(s["guest_gap_ms"]), cell(s["guest_disk_MiBps"])))
        for key in TARGETS:
            t = p["targets"][key]
            verdict = {True: "met", False: "NOT met", None: "n/a"}[t["pass"]]
            rows.append((p["name"], key, cell(t["value"]), f"<= {t['limit']}", verdict,
                         "", "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(heads))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true", help="one link, 1gbit:100ms")
    ap.add_argument("--link", action="append", default=[], metavar="RATE:RTT",
                    help=f"a link (repeatable; default {' '.join(LINKS)})")
    ap.add_argument("--workload", default="memdisk", help="test-guest workload")
    ap.add_argument("--ram", type=argtype(parse_size), default="128MiB",
                    help="guest RAM (default %(default)s)")
    ap.add_argument("--disk", type=argtype(parse_size), default="32MiB",
                    help="guest disk (default %(default)s)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per side and link (medians)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds until a migration that has not switched over is cancelled")
    ap.add_argument("--downtime-limit", type=argtype(parse_duration), default="300ms",
                    help="QEMU's downtime-limit, both sides (default %(default)s)")
    ap.add_argument("--max-bandwidth", default="link",
                    help="QEMU-side max-bandwidth: link (the link's rate), unlimited, or a "
                         "rate such as 500mbit (default %(default)s)")
    ap.add_argument("--copy-mode", choices=("background", "write-blocking"),
                    default="background", help="QEMU side's blockdev-mirror copy mode "
                    "(libvirt: background; write-blocking = --copy-storage-synchronous-writes)")
    ap.add_argument("--sides", default="qemu,xmig", help="which sides to run")
    ap.add_argument("--build", type=Path, default=default_build_dir(),
                    help="the test guest's build folder (default %(default)s)")
    args = ap.parse_args(argv)
    args.links = [parse_link(t) for t in (args.link or (QUICK_LINKS if args.quick else LINKS))]
    args.ram_mb = args.ram // MiB
    args.downtime_limit_ms = round(args.downtime_limit * 1000)
    args.sides = tuple(s.strip() for s in args.sides.split(","))
    return args


if __name__ == "__main__":
    ns = parse_args()
    with contextlib.redirect_stdout(sys.stderr):
        res = asyncio.run(main(ns))
    if ns.json:
        print(json.dumps(res, indent=1))
        print(table(res), file=sys.stderr)
    else:
        print(table(res))
    sys.exit(0 if res["all_pass"] else 1)
