"""Transport benchmark: xmig's session against one plain TCP stream, on the same link.

    python bench/transport.py --json --rate 1gbit --rtt 200ms --seconds 30
    python bench/transport.py --json --rate 100mbit --rtt 100ms --loss 0.1% --seconds 30
    python bench/transport.py --json --rate 1gbit --rtt 50ms --seconds 30 --cuts 5
    python bench/transport.py --json --loopback

Goodput is what the receiving *application* consumed, sampled by the receiver process every
0.25 s (both processes read the same CLOCK_MONOTONIC). ``*_goodput_bps`` is the steady
rate after ``--warmup`` seconds (TCP's slow start at long RTTs is not the transport's
doing; xmig keeps its connections for the whole migration, DESIGN.md); ``*_total_bps``
includes the warm-up. The receiver runs in its own process (in the destination's network
namespace over the emulated WAN), as a destination agent would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from xmig import __version__
from xmig.netem import LinkSpec, Wan
from xmig.transport import certs, connect, listen, tls
from xmig.transport.channels import Channel
from xmig.transport.client import DEFAULT_CONGESTION, DEFAULT_STREAMS
from xmig.transport.session import SessionConfig
from xmig.units import parse_bit_rate as parse_rate
from xmig.units import parse_duration, parse_fraction

SAMPLE = 0.25
CHUNK = 1 << 20


# -- receiver (runs as a subprocess: `transport.py serve …`) ---------------------------------


def _report(count: list[int], stop: asyncio.Event) -> asyncio.Task[None]:
    async def loop() -> None:
        while not stop.is_set():
            print(json.dumps({"t": time.monotonic(), "bytes": count[0]}), flush=True)
            try:
                async with asyncio.timeout(SAMPLE):
                    await stop.wait()
            except TimeoutError:
                pass
        print(json.dumps({"t": time.monotonic(), "bytes": count[0], "end": True}), flush=True)

    return asyncio.create_task(loop())


async def serve(args: argparse.Namespace) -> None:
    count = [0]
    stop = asyncio.Event()
    if args.mode == "tcp":
        server_sock = socket.create_server((args.host, args.port))
        print(json.dumps({"ready": server_sock.getsockname()[1]}), flush=True)
        loop = asyncio.get_running_loop()
        conn, _ = await loop.sock_accept(server_sock)
        reporter = _report(count, stop)
        buf = bytearray(CHUNK)
        while n := await loop.sock_recv_into(conn, buf):
            count[0] += n
        stop.set()
        await reporter
        return
    ctx = None
    if args.pki:
        ctx = tls.server_context(certs.PkiPaths.in_dir(Path(args.pki)))
    config = SessionConfig(idle_timeout=args.idle_timeout)
    async with listen(args.host, args.port, tls=ctx, insecure_plaintext=ctx is None,
                      config=config) as lst:
        print(json.dumps({"ready": lst.port}), flush=True)
        session = await lst.accept()
        reporter = _report(count, stop)
        try:
            while True:
                count[0] += len(await session.recv(Channel.MEMORY))
        except Exception:
            pass
        stop.set()
        await reporter
        print(json.dumps({"stats": session.stats()}), flush=True)


# -- sender -----------------------------------------------------------------------------


class Receiver:
    """A receiver subprocess and the timeline it reports."""

    def __init__(self, argv: list[str], wan: Wan | None) -> None:
        full = [sys.executable, os.path.abspath(__file__), "serve", *argv]
        self.proc = (wan.popen("dst", full, stdout=subprocess.PIPE) if wan
                     else subprocess.Popen(full, stdout=subprocess.PIPE))
        self.samples: list[tuple[float, int]] = []
        self.stats: dict[str, Any] = {}
        assert self.proc.stdout is not None
        first = json.loads(self.proc.stdout.readline())
        self.port = int(first["ready"])

    def collect(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            if "stats" in msg:
                self.stats = msg["stats"]
            else:
                self.samples.append((msg["t"], msg["bytes"]))
        self.proc.wait(timeout=30)

    def rate(self, t0: float, t1: float) -> float:
        """Bytes/s consumed between t0 and t1 (interpolated from the samples)."""

        def at(t: float) -> float:
            prev = (self.samples[0][0], 0)
            for ts, b in self.samples:
                if ts >= t:
                    if ts == prev[0]:
                        return float(b)
                    return prev[1] + (b - prev[1]) * (t - prev[0]) / (ts - prev[0])
                prev = (ts, b)
            return float(prev[1])

        return (at(t1) - at(t0)) / max(t1 - t0, 1e-9)


async def run_baseline(args: argparse.Namespace, wan: Wan | None, host: str) -> dict[str, float]:
    rx = Receiver(["--mode", "tcp", "--host", "0.0.0.0", "--port", "0"], wan)
    target = wan.dst_endpoint(rx.port) if wan else (host, rx.port)

    def send() -> tuple[float, float]:
        sock = wan.socket("src") if wan else socket.socket()
        sock.connect(target)
        data = os.urandom(CHUNK)
        t0 = time.monotonic()
        deadline = t0 + args.seconds
        while time.monotonic() < deadline:
            sock.sendall(data)
        sock.close()
        return t0, deadline

    t0, t1 = await asyncio.to_thread(send)
    await asyncio.to_thread(rx.collect)
    end = rx.samples[-1][0]
    total = rx.samples[-1][1]
    return {"goodput_Bps": rx.rate(t0 + args.warmup, t1), "total_Bps": total / (end - t0)}


async def run_xmig(args: argparse.Namespace, wan: Wan | None, host: str, pki: Path | None
                   ) -> dict[str, Any]:
    rx_args = ["--mode", "xmig", "--host", "0.0.0.0", "--port", "0",
               "--idle-timeout", str(args.idle_timeout), "--loop", args.loop]
    rx_args += ["--pki", str(pki)] if pki else []
    rx = Receiver(rx_args, wan)
    dst_host, dst_port = wan.dst_endpoint(rx.port) if wan else (host, rx.port)
    ctx: ssl.SSLContext | None = (
        tls.client_context(certs.PkiPaths.in_dir(pki)) if pki else None
    )
    config = SessionConfig(idle_timeout=args.idle_timeout)
    factory = (lambda: wan.socket("src")) if wan else None
    data = os.urandom(args.frame_bytes)
    cuts: list[float] = []
    restores: list[float] = []  # monotonic times the link came back
    back: list[float | None] = []  # seconds from each restore to all streams ready again
    async with connect(dst_host, dst_port, tls=ctx, server_hostname=dst_host,
                       insecure_plaintext=ctx is None, streams=args.streams, config=config,
                       socket_factory=factory, connect_timeout=30,
                       congestion=args.congestion) as session:
        t0 = time.monotonic()
        deadline = t0 + args.seconds

        async def cutter() -> None:
            assert wan is not None
            for i in range(args.cuts):
                at = t0 + (i + 1) * args.seconds / (args.cuts + 1)
                await asyncio.sleep(max(0.0, at - time.monotonic()))  # a schedule, not a wait
                wan.cut()
                cuts.append(time.monotonic() - t0)
                await asyncio.sleep(args.cut_seconds)
                wan.restore()
                restores.append(time.monotonic())
                upto = t0 + (i + 2) * args.seconds / (args.cuts + 1)  # the next cut
                try:
                    async with asyncio.timeout(max(0.0, upto - time.monotonic())):
                        await session.wait_until(
                            lambda: len(session.session.connections) >= args.streams)
                    back.append(time.monotonic() - restores[-1])
                except TimeoutError:
                    back.append(None)

        cut_task = asyncio.create_task(cutter()) if args.cuts else None
        while time.monotonic() < deadline:
            await session.send(Channel.MEMORY, data)
        t1 = time.monotonic()
        await session.drain()
        if cut_task:
            await cut_task
        stats = session.stats()
        await session.close()
    await asyncio.to_thread(rx.collect)
    end = rx.samples[-1][0]
    sent_unique = stats["sent_bytes"] - stats["resent_bytes"]
    return {
        "goodput_Bps": rx.rate(t0 + args.warmup, t1),
        "total_Bps": rx.samples[-1][1] / (end - t0),
        "bytes": rx.samples[-1][1],
        "sent_unique_bytes": sent_unique,
        "resent_bytes": stats["resent_bytes"],
        "resent_ratio": stats["resent_bytes"] / max(sent_unique, 1),
        "reconnects": stats["reconnects"],
        "duplicates_dropped": rx.stats.get("duplicates_dropped"),
        "min_rtt_ms": (stats["min_rtt_s"] or 0) * 1000,
        "cuts_at_s": [round(c, 2) for c in cuts],
        **_recovery(rx, restores, back, t1, args.cut_seconds),
    }


def _recovery(rx: Receiver, restores: list[float], back: list[float | None], t1: float,
              cut_seconds: float) -> dict[str, Any]:
    """After each restore: seconds until every stream was ready again, until the receiving
    application consumed data again (to the receiver's 0.25 s sampling), and the goodput
    (bits/s) from the restore to the next cut or the end of sending."""
    if not restores:
        return {}
    first: list[float | None] = []
    rates: list[float] = []
    for i, r in enumerate(restores):
        end = restores[i + 1] - cut_seconds if i + 1 < len(restores) else t1  # the next cut
        at_r = next((b for ts, b in rx.samples if ts >= r), None)
        later = [ts for ts, b in rx.samples if ts > r and at_r is not None and b > at_r]
        first.append(round(later[0] - r, 2) if later else None)
        rates.append(rx.rate(r, end) * 8)
    return {"ready_after_restore_s": [None if b is None else round(b, 2) for b in back],
            "data_after_restore_s": first,
            "goodput_after_restore_bps": [round(x) for x in rates]}


def _default_cc() -> str:
    try:
        return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        return "unknown"


def versions() -> dict[str, str]:
    import cryptography

    out = {"xmig": __version__, "python": platform.python_version(),
           "openssl": ssl.OPENSSL_VERSION, "cryptography": cryptography.__version__,
           "kernel": platform.release()}
    try:
        import uvloop

        out["uvloop"] = uvloop.__version__
    except ImportError:
        pass
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        pki = None
        if not args.plaintext:
            pki = Path(tmp) / "pki"
            certs.init_pki(pki, server_names=("localhost", "127.0.0.1", "10.0.0.0"))
        out: dict[str, Any] = {"tls": pki is not None, "streams": args.streams,
                               "congestion": args.congestion,
                               "baseline_congestion": _default_cc(),
                               "frame_bytes": args.frame_bytes, "seconds": args.seconds,
                               "loop": args.loop, "versions": versions()}
        if args.loopback:
            runs = [await run_xmig(args, None, "127.0.0.1", pki) for _ in range(args.repeat)]
            rates = sorted(r["goodput_Bps"] for r in runs)
            out.update(goodput_Bps=statistics.median(rates), goodput_runs_Bps=rates,
                       xmig=runs[0])
            return out
        rate = parse_rate(args.rate)
        rtt = parse_duration(args.rtt)
        spec = LinkSpec.symmetric(rate_bps=rate, rtt_s=rtt, loss=parse_fraction(args.loss),
                                  seed=args.seed)
        with Wan(spec) as wan:
            if pki is not None:  # the emulator's addresses are known only now
                certs.init_pki(pki, server_names=(wan.dst_addr, "127.0.0.1"), force=True)
            out.update(link_rate_bps=rate, rtt_ms=rtt * 1000, loss=spec.loss,
                       approximate=wan.approximate)
            if not args.cuts and not args.no_baseline:
                base = await run_baseline(args, wan, wan.dst_addr)
                out.update(baseline_goodput_bps=base["goodput_Bps"] * 8,
                           baseline_total_bps=base["total_Bps"] * 8)
            x = await run_xmig(args, wan, wan.dst_addr, pki)
            out.update(xmig_goodput_bps=x["goodput_Bps"] * 8, xmig_total_bps=x["total_Bps"] * 8,
                       utilization=x["goodput_Bps"] * 8 / rate, resent_ratio=x["resent_ratio"],
                       xmig=x, emulator=wan.stats())
            if "baseline_goodput_bps" in out:
                out["ratio_vs_baseline"] = out["xmig_goodput_bps"] / out["baseline_goodput_bps"]
        return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if (argv and argv[0] == "serve") or (argv is None and sys.argv[1:2] == ["serve"]):
        p.add_argument("serve")
        p.add_argument("--mode", choices=["xmig", "tcp"], required=True)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=0)
        p.add_argument("--pki")
        p.add_argument("--idle-timeout", type=float, default=5.0)
        p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
        return p.parse_args(argv)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--loopback", action="store_true", help="no emulator: raw stack speed")
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--rtt", default="200ms")
    p.add_argument("--loss", default="0")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds excluded from the steady goodput (default: a third)")
    p.add_argument("--streams", type=int, default=DEFAULT_STREAMS)
    p.add_argument("--frame-bytes", type=int, default=1 << 20)
    p.add_argument("--cuts", type=int, default=0)
    p.add_argument("--cut-seconds", type=float, default=2.0)
    p.add_argument("--idle-timeout", type=float, default=1.0)
    p.add_argument("--plaintext", action="store_true", help="switch TLS off (benchmark only)")
    p.add_argument("--congestion", default=DEFAULT_CONGESTION,
                   help=f"xmig's sockets' TCP congestion control (default {DEFAULT_CONGESTION})")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5,
                   help="loopback: runs to take the median of (this box's speed varies)")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = args.seconds / 3
    return args


if __name__ == "__main__":
    ns = parse_args()
    if ns.loop == "uvloop":
        import uvloop

        uvloop.install()
    if getattr(ns, "serve", None):
        asyncio.run(serve(ns))
        sys.exit(0)
    result = asyncio.run(main(ns))
    print(json.dumps(result, indent=None if ns.json else 2))
