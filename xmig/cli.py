"""The ``xmig`` command. It parses flags, calls the library and renders what it reports.

A typed :class:`~xmig.errors.XmigError` becomes one red line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.text import Text

from xmig import __version__
from xmig.errors import ConfigError, XmigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xmig", description=__doc__)
    parser.add_argument("--version", action="version", version=f"xmig {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    from xmig.netem import cli as netem_cli
    from xmig.transport import cli as transport_cli

    transport_cli.add_parsers(sub)
    netem_cli.add_parsers(sub)
    demo = sub.add_parser(
        "demo", help="run a whole session over an emulated WAN link on this machine",
        description="Send data with TLS over an emulated WAN link (root: TUN emulator between "
        "network namespaces; otherwise an approximate loopback relay), cut the link at half "
        "way and ride it out, then verify the data by digest. (Guest migration arrives with "
        "the reference guest.)",
    )
    demo.add_argument("--rate", default="1gbit", help="link rate (default 1gbit)")
    demo.add_argument("--rtt", default="50ms", help="round-trip time (default 50ms)")
    demo.add_argument("--loss", default="0", help="random loss, e.g. 0.1%% (default 0)")
    demo.add_argument("--size", default="512MiB", help="bytes to send (default 512MiB)")
    demo.add_argument("--streams", type=int, default=2, help="parallel TCP connections")
    demo.add_argument("--cut-seconds", type=float, default=2.0,
                      help="length of the link cut at half way (0: no cut)")
    out = demo.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="JSON lines: progress, then the result")
    out.add_argument("--quiet", action="store_true", help="only the final result")
    demo.set_defaults(func=run_demo)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from xmig.demo import DemoProgress, progress_dict, run_transport_demo
    from xmig.netem import LinkSpec, parse_duration, parse_fraction, parse_rate, parse_size

    if args.streams < 1:
        raise ConfigError(f"--streams must be at least 1, not {args.streams}")
    if args.cut_seconds < 0:
        raise ConfigError("--cut-seconds cannot be negative")
    spec = LinkSpec.symmetric(rate_bps=parse_rate(args.rate), rtt_s=parse_duration(args.rtt),
                              loss=parse_fraction(args.loss))
    total = parse_size(args.size)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except XmigError as err:
        console = Console(stderr=True, soft_wrap=True)  # one line, however long
        console.print(Text(f"xmig: {type(err).__name__}: {err}", style="bold red"))
        return 2
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
