"""``xmig demo``: a whole migration of the reference guest over an emulated WAN link on this
machine (or, with ``--transport``, only the transport with a link cut)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from xmig.cli.view import ProgressView, summary
from xmig.errors import ConfigError
from xmig.units import (
    argtype,
    parse_bit_rate,
    parse_byte_rate,
    parse_duration,
    parse_fraction,
    parse_size,
)

MiB = 1 << 20
WRITE_SIZE = 4096


def _flag(parse: Any, flag: str) -> Any:
    """The argparse type of ``flag``: a bad value is a ConfigError naming it (one red line,
    exit 2), read by :mod:`xmig.units` like every size, rate and duration of xmig."""
    return argtype(parse, flag=flag)


def add_parsers(sub: Any) -> None:
    demo = sub.add_parser(
        "demo", help="migrate a running reference guest over an emulated WAN on this machine",
        description="Start a reference guest (RAM, disk, workload), two agents and an emulated "
        "WAN link between network namespaces (root; otherwise an approximate loopback relay), "
        "and migrate the guest: pre-copy with SDPS, disk bulk copy with asynchronous "
        "mirroring, atomic switchover. Prints progress, then the report.",
    )
    demo.add_argument("--guest", choices=["sim", "qemu"], default="sim",
                      help="sim: the reference guest (default); qemu: the test guest booted "
                      "under QEMU (TCG), built from Debian packages in $XMIG_GUEST_BUILD or "
                      "build/guest (make guest-image)")
    demo.add_argument("--rate", type=_flag(parse_bit_rate, "--rate"),
                      metavar="RATE", default="200mbit",
                      help="link rate in bits/s (default %(default)s)")
    demo.add_argument("--rtt", type=_flag(parse_duration, "--rtt"),
                      metavar="DURATION", default="50ms",
                      help="round-trip time (default %(default)s)")
    demo.add_argument("--loss", type=_flag(parse_fraction, "--loss"),
                      metavar="FRACTION", default="0",
                      help="random loss, e.g. 0.1%% or 0.001 (default %(default)s)")
    demo.add_argument("--ram", type=_flag(parse_size, "--ram"), metavar="SIZE", default="256MiB",
                      help="guest RAM (default %(default)s)")
    demo.add_argument("--disk", type=_flag(parse_size, "--disk"), metavar="SIZE", default="256MiB",
                      help="guest disk (default %(default)s)")
    demo.add_argument("--workload", default="oltp",
                      choices=["idle", "uniform", "hotset", "scan", "oltp"])
    demo.add_argument("--dirty-rate", type=_flag(parse_byte_rate, "--dirty-rate"), metavar="RATE",
                      default="60MB/s", help="page-write rate, bytes/s (default %(default)s)")
    demo.add_argument("--disk-rate", type=_flag(parse_byte_rate, "--disk-rate"), metavar="RATE",
                      default="4MB/s", help="oltp disk-write rate, bytes/s (default %(default)s)")
    demo.add_argument("--write-size", type=_flag(parse_size, "--write-size"), metavar="SIZE",
                      default=str(WRITE_SIZE),
                      help="bytes of a page each page write changes (default %(default)s: "
                      "whole pages: the guest outruns the link and SDPS shows)")
    demo.add_argument("--max-downtime", type=_flag(parse_duration, "--max-downtime"),
                      metavar="DURATION",
                      default="300ms", help="downtime budget (default %(default)s)")
    demo.add_argument("--timeout", type=_flag(parse_duration, "--timeout"),
                      metavar="DURATION", default="120s",
                      help="give up pre-copy after this (default %(default)s)")
    demo.add_argument("--sdps", choices=["on", "off", "autoconverge"], default="on")
    demo.add_argument("--streams", type=int, default=2, help="parallel TCP connections")
    demo.add_argument("--no-verify", action="store_true",
                      help="keep no memory and disk digests (less CPU during pre-copy; "
                      "'verified' is then null)")
    demo.add_argument("--plot", type=Path, metavar="FILE.png",
                      help="the timeline: rates per channel, dirty rate, throttle, downtime")
    demo.add_argument("--report", type=Path, metavar="FILE.json",
                      help="write the whole report (with its timeline) here")
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--transport", action="store_true",
                      help="only the transport: send --size bytes, cut the link at half way")
    demo.add_argument("--size", type=_flag(parse_size, "--size"), metavar="SIZE", default="512MiB",
                      help="with --transport: bytes to send (default %(default)s)")
    demo.add_argument("--cut-seconds", type=_flag(parse_duration, "--cut-seconds"),
                      metavar="DURATION",
                      default="2s", help="with --transport: length of the link cut, e.g. 2s "
                      "or 1.5 (seconds; 0: none; default %(default)s)")
    out = demo.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="JSON lines: progress, then the report")
    out.add_argument("--quiet", action="store_true", help="only the final report")
    demo.set_defaults(func=run_demo)


def _link(args: argparse.Namespace) -> Any:
    from xmig.netem import LinkSpec

    if args.streams < 1:
        raise ConfigError(f"--streams must be at least 1, not {args.streams}")
    return LinkSpec.symmetric(rate_bps=args.rate, rtt_s=args.rtt, loss=args.loss)


def run_demo(args: argparse.Namespace) -> int:
    spec = _link(args)
    if args.transport:
        return _run_transport(args, spec)
    if args.guest == "qemu":
        return _run_qemu(args, spec)
    from xmig.guest.sim import SimConfig
    from xmig.guest.sim.source import MigrationOptions
    from xmig.harness.localrun import LocalRun, run_local

    run = LocalRun(
        guest=SimConfig(ram_bytes=args.ram, workload=args.workload, rate_Bps=args.dirty_rate,
                        disk_rate_Bps=args.disk_rate if args.workload == "oltp" else 0.0,
                        hotset_bytes=min(64 * MiB, args.ram // 4), seed=args.seed,
                        write_size=args.write_size,
                        disk_url="nbd+unix:///?socket=/set-by-run_local"),
        link=spec, disk_bytes=args.disk, streams=args.streams,
        options=MigrationOptions(max_downtime_s=args.max_downtime, timeout_s=args.timeout,
                                 sdps=args.sdps, verify=not args.no_verify),
    )
    console = Console()
    if args.json:
        report = asyncio.run(run_local(
            run, on_event=lambda e: print(json.dumps(e), flush=True))).to_json()
        _save(args, report)
        print(json.dumps(report), flush=True)
        return 0 if report.get("verified") is not False and report["status"] == "done" else 1
    view = ProgressView(f"xmig demo: {args.workload} guest over {spec.describe()}",
                        budget_s=run.options.max_downtime_s)
    with Live(view.render(), console=console, refresh_per_second=4,
              transient=False) if not args.quiet else _Null() as live:
        def show(event: dict[str, Any]) -> None:
            view.update(event)
            if live is not None:
                live.update(view.render())

        report = asyncio.run(run_local(run, on_event=show)).to_json()
    _save(args, report)
    report.pop("timeline", None)
    if report.get("status") == "done":
        console.print(summary({**report, "name": "the reference guest",
                               "to": "the destination agent"}))
    else:
        console.print(f"[yellow]{report.get('status')}: {report.get('error')}[/]")
    console.print_json(json.dumps(report))
    return 0 if report.get("verified") is not False and report.get("status") == "done" else 1


def _run_qemu(args: argparse.Namespace, spec: Any) -> int:
    """The QEMU test guest (memdisk workload) migrated over the emulated link."""
    from xmig.guest.qemu.migrate import QemuMigrationOptions
    from xmig.harness.localrun import run_local
    from xmig.harness.qemurun import QemuRun, default_build_dir

    run = QemuRun(link=spec, build_dir=default_build_dir(),
                  ram_mb=min(args.ram, 512 * MiB) // MiB,
                  disk_bytes=min(args.disk, 256 * MiB),
                  streams=args.streams,
                  options=QemuMigrationOptions(
                      downtime_limit_ms=int(args.max_downtime * 1000),
                      timeout_s=args.timeout, sdps=args.sdps == "on"))
    console = Console()

    def show(event: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(event), flush=True)
        elif not args.quiet and event.get("event") in ("booted", "phase"):
            console.print(f"[dim]{event.get('event')}: {event.get('phase', '')} "
                          f"{event.get('note', '')}[/]")

    report = asyncio.run(run_local(run, on_event=show)).to_json()
    _save(args, report)
    if args.json:
        print(json.dumps(report), flush=True)
    else:
        report.pop("timeline", None)
        console.print_json(json.dumps(report))
    return 0 if report.get("status") == "done" and report.get("verified") else 1


def _save(args: argparse.Namespace, report: dict[str, Any]) -> None:
    if args.report:
        args.report.write_text(json.dumps(report, indent=1) + "\n")
    if args.plot and report.get("timeline"):
        from xmig.harness.plot import plot_timeline

        plot_timeline(report, args.plot)


def _run_transport(args: argparse.Namespace, spec: Any) -> int:
    from xmig.harness.demo import DemoProgress, progress_dict, run_transport_demo

    total = args.size
    if total < (1 << 20):
        raise ConfigError("--size must be at least 1MiB")
    console = Console()
    if args.json:
        def show(p: DemoProgress) -> None:
            print(json.dumps(progress_dict(p)), flush=True)

        result = asyncio.run(run_transport_demo(spec, total_bytes=total, streams=args.streams,
                                                cut_seconds=args.cut_seconds, on_progress=show))
        print(json.dumps(result), flush=True)
        return 0 if result["verified"] else 1
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                   TextColumn("{task.fields[info]}"), console=console,
                   disable=args.quiet)
    with bar:
        task = bar.add_task("transfer", total=total, info="")

        def render(p: DemoProgress) -> None:
            rtt = f"{p.min_rtt_ms:.0f} ms" if p.min_rtt_ms else "-"
            state = "[red]LINK CUT[/]" if p.link_cut else f"{p.connections} conns"
            bar.update(task, completed=p.acked_bytes, info=(
                f"{p.delivery_rate_Bps * 8 / 1e6:7.1f} Mbit/s  rtt {rtt}  {state}  "
                f"reconnects {p.reconnects}"))

        result = asyncio.run(run_transport_demo(spec, total_bytes=total, streams=args.streams,
                                                cut_seconds=args.cut_seconds, on_progress=render))
    ok = "[green]verified[/]" if result["verified"] else "[red]DIGEST MISMATCH[/]"
    console.print(
        f"{result['bytes'] / 2**20:.0f} MiB in {result['total_s']:.1f} s "
        f"({result['goodput_bps'] / 1e6:.0f} Mbit/s) over {spec.describe()}, "
        f"link cut {args.cut_seconds:g} s, reconnects {result['reconnects']}, "
        f"resent {result['resent_bytes'] / 2**20:.1f} MiB: {ok}"
        + (" [yellow](approximate link: no root)[/]" if result["approximate_link"] else "")
    )
    console.print_json(json.dumps(result))
    return 0 if result["verified"] else 1


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
