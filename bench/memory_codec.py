"""Memory page codec benchmark: throughput, wire ratio, compressor choice, deltas, SDPS α.

    python bench/memory_codec.py --json                # 256 MiB of the reference content mix
    python bench/memory_codec.py --json --mib 1024 --repeat 3
    python bench/memory_codec.py --json --sdps         # also the α sweep of the SDPS simulation

- ``codec``: round 0 of a guest filled with :class:`xmig.memory.testing.ContentMix` (30 %
  zero, 35 % text and code from the Python standard library, 20 % random, 10 % pages of
  8 repeated patterns, 5 % sparse) through :class:`PageEncoder` (4096-page chunks, as the
  engine) and :class:`PageDecoder`: GB/s of guest memory (raw bytes ÷ CPU-bound time, one
  thread), ``wire_ratio`` = wire bytes ÷ guest bytes. Best of ``--repeat``.
- ``compressors``: zstd levels (and lz4 if the ``lz4`` package is importable) on the
  non-zero pages of the same mix, in 1 MiB blocks: MB/s compressing, ratio.
- ``delta``: rounds 1 and 2 after the same 20 % of the non-zero pages were edited each
  time (4 words each, the ``edit`` write of :class:`~xmig.memory.testing.Writer`): wire
  bytes per re-sent page with the 64 MiB delta cache and without it (round 1 finds what
  round 0 left in the LRU cache, round 2 finds every page).
- ``sdps`` (``--sdps``): for α in 0.4 … 0.9, simulated guests at 1.5×, 2× and 4× the link
  (100 Mbit/s and 1 Gbit/s, working sets 64 and 512 MiB, ±30 % rate-measurement noise):
  length of the SDPS phase in units of "time to send 1 GiB", mean peak throttle, rounds.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np
import zstandard

from xmig import __version__
from xmig.memory.codec import CodecConfig, PageDecoder, PageEncoder
from xmig.memory.guest import PAGE_SIZE
from xmig.memory.precopy import PlannerConfig
from xmig.memory.sdps import ProportionalThrottle
from xmig.memory.sdps.simulate import SimGuest, SimLink, simulate
from xmig.memory.testing import ArrayMemory

CHUNK = 4096


def encode_all(enc: PageEncoder, mem: ArrayMemory, idx: np.ndarray) -> tuple[list[bytes], float]:
    msgs: list[bytes] = []
    t = time.perf_counter()
    for s in range(0, len(idx), CHUNK):
        part = idx[s:s + CHUNK]
        msgs += enc.encode(part, mem.read_pages(part))
    return msgs, time.perf_counter() - t


def bench_codec(mem: ArrayMemory, repeat: int, level: int) -> dict[str, Any]:
    n = mem.page_count
    idx = np.arange(n, dtype=np.int64)
    best_e, best_d, ratio, stats = float("inf"), float("inf"), 0.0, {}
    for _ in range(repeat):
        enc = PageEncoder(n, CodecConfig(level=level))
        msgs, te = encode_all(enc, mem, idx)
        dst = ArrayMemory(n)
        dec = PageDecoder(n)
        t = time.perf_counter()
        for m in msgs:
            dec.feed(m, dst)
        td = time.perf_counter() - t
        assert np.array_equal(dst.pages, mem.pages)
        best_e, best_d = min(best_e, te), min(best_d, td)
        ratio = enc.stats.wire_ratio
        stats = vars(enc.stats).copy()
    raw = n * PAGE_SIZE
    return {"level": level, "encode_GBps": raw / best_e / 1e9, "decode_GBps": raw / best_d / 1e9,
            "wire_ratio": ratio, "stats": stats}


def bench_compressors(mem: ArrayMemory) -> list[dict[str, Any]]:
    nonzero = mem.pages[mem.pages.any(axis=1)]
    blocks = [nonzero[k:k + 256].tobytes() for k in range(0, len(nonzero), 256)]
    raw = sum(len(b) for b in blocks)
    out = []
    candidates: list[tuple[str, Any]] = [
        (f"zstd{lv}", zstandard.ZstdCompressor(level=lv).compress) for lv in (-5, -1, 1, 3, 6)]
    try:
        lz4 = importlib.import_module("lz4.frame")  # optional: not a dependency
        candidates.append(("lz4", lz4.compress))
    except ImportError:
        pass
    for name, fn in candidates:
        t = time.perf_counter()
        wire = sum(len(fn(b)) for b in blocks)
        dt = time.perf_counter() - t
        out.append({"compressor": name, "MBps": raw / dt / 1e6, "ratio": wire / raw})
    return out


def _edit(mem: ArrayMemory, pages: np.ndarray, rng: np.random.Generator) -> None:
    """The Writer's ``edit`` write: 4 random words of each page."""
    words = mem.pages[pages].view(np.uint64)
    cols = rng.integers(0, PAGE_SIZE // 8, size=(len(pages), 4))
    words[np.arange(len(pages))[:, None], cols] = rng.integers(
        0, 1 << 63, size=cols.shape, dtype=np.int64).astype(np.uint64)
    mem.pages[pages] = words.view(np.uint8)


def bench_delta(mem: ArrayMemory, seed: int) -> dict[str, Any]:
    """Round 0, then two rounds re-sending the same 20 % of the non-zero pages, edited.
    Round 1 finds in the cache what round 0 left there (its last 64 MiB); round 2 finds
    every page round 1 sent."""
    n = mem.page_count
    idx = np.arange(n, dtype=np.int64)
    nz = np.flatnonzero(mem.pages.any(axis=1))
    result: dict[str, Any] = {}
    for name, cache in (("cache_64MiB", 64 << 20), ("no_cache", 0)):
        rng = np.random.default_rng(seed)
        again = np.sort(rng.choice(nz, len(nz) // 5, replace=False)).astype(np.int64)
        result["pages"] = len(again)
        src = ArrayMemory(n)
        src.pages[:] = mem.pages
        enc = PageEncoder(n, CodecConfig(cache_bytes=cache))
        encode_all(enc, src, idx)
        for rnd in (1, 2):
            _edit(src, again, rng)
            before = enc.stats.copy()
            _, dt = encode_all(enc, src, again)
            wire = enc.stats.wire_bytes - before.wire_bytes
            result[f"{name}_round{rnd}"] = {
                "wire_bytes_per_page": wire / len(again),
                "wire_ratio": wire / (len(again) * PAGE_SIZE),
                "deltas": enc.stats.delta_pages - before.delta_pages,
                "encode_GBps": len(again) * PAGE_SIZE / dt / 1e9,
            }
    return result


def bench_sdps() -> list[dict[str, Any]]:
    cfg = PlannerConfig(timeout=600)
    out = []
    for alpha in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        phases, peaks, rounds, ok = [], [], [], 0
        for rate in (12.5e6, 125e6):
            for base in (1.5, 2.0, 4.0):
                for wss in (64 << 20, 512 << 20):
                    for seed in range(3):
                        g = SimGuest(base_dirty=base * rate, noise=0.3, wss=wss)
                        r = simulate(ProportionalThrottle(alpha=alpha), g, SimLink(rate=rate),
                                     cfg, seed=seed)
                        ok += r.converged
                        phases.append((r.time - (r.engaged_at or r.time)) * rate / (1 << 30))
                        peaks.append(r.max_throttle)
                        rounds.append(r.rounds)
        out.append({"alpha": alpha, "converged": ok, "runs": len(phases),
                    "sdps_phase_mean": statistics.mean(phases), "sdps_phase_max": max(phases),
                    "peak_throttle_mean": statistics.mean(peaks), "rounds_max": max(rounds)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--mib", type=int, default=256, help="guest size (MiB)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--levels", default="-1,1,3", help="zstd levels for the full codec run")
    ap.add_argument("--sdps", action="store_true", help="also run the SDPS α sweep")
    args = ap.parse_args(argv)
    mem = ArrayMemory(args.mib * (1 << 20) // PAGE_SIZE)
    mem.fill(seed=args.seed)
    result: dict[str, Any] = {
        "versions": {"python": sys.version.split()[0], "xmig": __version__,
                     "zstandard": zstandard.__version__, "numpy": np.__version__,
                     "machine": platform.machine(), "kernel": platform.release()},
        "guest_MiB": args.mib,
        "codec": [bench_codec(mem, args.repeat, int(lv)) for lv in args.levels.split(",")],
        "compressors": bench_compressors(mem),
        "delta": bench_delta(mem, args.seed),
    }
    if args.sdps:
        result["sdps"] = bench_sdps()
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for c in result["codec"]:
            print(f"zstd {c['level']:>2}: encode {c['encode_GBps']:.2f} GB/s, decode "
                  f"{c['decode_GBps']:.2f} GB/s, wire ratio {c['wire_ratio']:.3f}")
        for c in result["compressors"]:
            print(f"{c['compressor']:>7}: {c['MBps']:.0f} MB/s, ratio {c['ratio']:.3f}")
        for k, v in result["delta"].items():
            print(f"delta {k}: {v}")
        for s in result.get("sdps", []):
            print(json.dumps(s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
