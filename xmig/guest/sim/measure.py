"""Measure the reference guest on this machine: ``python -m xmig.guest.sim.measure [--json]``.

Start time of a fresh guest (RAM fill), the highest page-write rate one guest process
reaches per workload, how progress follows the throttle, and pause/resume latency.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from xmig.guest.sim.config import SimConfig
from xmig.guest.sim.host import Progress, SimGuest
from xmig.memory.guest import PAGE_SIZE

MiB = 1 << 20


def window(guest: SimGuest, seconds: float) -> tuple[Progress, Progress]:
    before = guest.progress()
    after = guest.wait_until(
        lambda p: p.last_progress_mono >= before.last_progress_mono + seconds, seconds + 10
    )
    return before, after


def start_time(ram_bytes: int, workdir: Path) -> float:
    began = time.monotonic()
    guest = SimGuest.start(SimConfig(ram_bytes=ram_bytes), workdir=workdir, paused=True)
    elapsed = time.monotonic() - began
    guest.quit()
    return elapsed


def max_rate(workload: str, write_size: int, workdir: Path, seconds: float) -> float:
    config = SimConfig(ram_bytes=256 * MiB, workload=workload, rate_Bps=math.inf,
                       write_size=write_size, hotset_bytes=16 * MiB)
    with SimGuest.start(config, workdir=workdir) as guest:
        window(guest, 0.2)
        before, after = window(guest, seconds)
    dt = after.last_progress_mono - before.last_progress_mono
    return (after.page_writes - before.page_writes) * PAGE_SIZE / dt


def speed(guest: SimGuest, throttle: float, seconds: float) -> float:
    guest.set_throttle(throttle)
    window(guest, 0.05)
    before, after = window(guest, seconds)
    return (after.counter - before.counter) / (after.last_progress_mono - before.last_progress_mono)


def throttle_curve(rate: float, workdir: Path, seconds: float) -> dict[str, float]:
    """Progress at each throttle ÷ unthrottled progress, measured in alternation (three
    rounds of ``seconds / 3`` each) so that other load on the machine weighs on both."""
    config = SimConfig(ram_bytes=256 * MiB, workload="uniform", rate_Bps=rate)
    curve: dict[str, float] = {}
    with SimGuest.start(config, workdir=workdir) as guest:
        for fraction in (0.25, 0.5, 0.75, 0.9):
            full = throttled = 0.0
            for _ in range(3):
                full += speed(guest, 0.0, seconds / 3)
                throttled += speed(guest, fraction, seconds / 3)
            curve[f"{fraction:.2f}"] = throttled / full
    return curve


def pause_resume(workdir: Path) -> dict[str, float]:
    config = SimConfig(ram_bytes=256 * MiB, workload="uniform", rate_Bps=math.inf)
    pauses, resumes = [], []
    with SimGuest.start(config, workdir=workdir) as guest:
        for _ in range(20):
            window(guest, 0.02)
            began = time.monotonic()
            guest.pause()
            pauses.append(time.monotonic() - began)
            began = time.monotonic()
            guest.resume()
            resumes.append(time.monotonic() - began)
    return {"pause_ms_max": 1e3 * max(pauses), "pause_ms_mean": 1e3 * sum(pauses) / len(pauses),
            "resume_ms_max": 1e3 * max(resumes)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        results["start_s"] = {f"{n >> 20} MiB": start_time(n, workdir)
                              for n in (256 * MiB, 1024 * MiB)}
        results["max_write_MBps"] = {
            f"{w} write_size={s}": max_rate(w, s, workdir, args.seconds) / 1e6
            for w in ("uniform", "hotset", "scan", "oltp") for s in (256, 4096)
        }
        results["throttle_progress_ratio"] = {
            "cpu-bound": throttle_curve(math.inf, workdir, args.seconds),
            "paced 50 MB/s": throttle_curve(50e6, workdir, args.seconds),
        }
        results["pause_resume"] = pause_resume(workdir)
    print(json.dumps(results, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
