"""Operator commands, in the style of libvirtd + virsh: the process hosting a guest runs
its migration; a thin client asks for it and renders the progress.

    xmig guest start --name vm1 --workdir /var/lib/xmig --ram 1GiB &   # source host
    xmig agent --listen 0.0.0.0:7800 --pki /etc/xmig/pki --workdir /var/lib/xmig &  # dest
    xmig migrate --guest /var/lib/xmig/vm1.ctl --to dst.example.net:7800 --pki /etc/xmig/pki
    xmig guest status --guest /var/lib/xmig/vm1.ctl;  xmig guest stop --guest ...

``xmig migrate`` exits 0 when the guest runs on the destination; 2 on bad input: what it was
given cannot be used and nothing was asked of the destination (flags, PKI, a path that is not
what its flag needs: no xmig guest host's control socket at ``--guest``, no QMP socket of a
QEMU xmig can migrate at ``--qemu-qmp``); 3 when the migration did not happen or was aborted
(the source guest runs on: host busy, agent unreachable, refused, not converging, ...); 4 when
it is in doubt: GO was given and the destination has not confirmed that the guest runs there
(the source keeps its paused copy and keeps telling the destination until it answers).
Every error is one red line ``xmig: TYPE: what, in words``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from xmig.cli.view import ProgressView, plan_summary, summary
from xmig.errors import ConfigError, GuestNotFound, XmigError
from xmig.protocol.control import MAX_PROBE_S
from xmig.service import hostctl
from xmig.units import argtype, parse_bit_rate, parse_byte_rate, parse_duration, parse_size

if TYPE_CHECKING:
    from xmig.orchestrator.report import Report

EXIT_BAD_INPUT, EXIT_NOT_MIGRATED, EXIT_IN_DOUBT = 2, 3, 4


def _endpoint(text: str) -> str:
    hostctl.parse_endpoint(text)
    return text


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"want a positive integer, not {text!r}")
    return int(text)


# argparse types: a bad value is argparse's usage error (exit 2)
size, byte_rate, duration = argtype(parse_size), argtype(parse_byte_rate), argtype(parse_duration)
bit_rate, endpoint, positive = argtype(parse_bit_rate), argtype(_endpoint), argtype(_positive_int)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction within (0, 1)")
    return value


def add_parsers(sub: Any) -> None:
    """Register ``guest``, ``migrate`` and ``agent`` on the ``xmig`` parser."""
    _add_guest(sub)
    _add_migrate(sub)
    _add_agent(sub)


def _add_guest(sub: Any) -> None:
    guest = sub.add_parser("guest", help="run a reference guest; ask its host for status/stop",
                           description="Host a reference guest (start, in the foreground), "
                           "or talk to the host of one through its control socket.")
    cmds = guest.add_subparsers(dest="guest_command", metavar="COMMAND", required=True)
    start = cmds.add_parser(
        "start", help="start a guest and host it (foreground) until stopped or migrated",
        description="Start a reference guest (RAM, a disk served by xmig's NBD server, a "
        "workload) and serve its control socket DIR/NAME.ctl. Prints one line when ready. "
        "Runs until the guest is stopped (xmig guest stop, SIGTERM, SIGINT) or has migrated "
        "away. Files go to DIR/NAME/ (disk.raw is reused if it exists).")
    start.add_argument("--name", required=True, help="the guest's name (letters, digits, _.-)")
    start.add_argument("--workdir", required=True, type=Path, metavar="DIR")
    start.add_argument("--ram", type=size, default="256MiB", metavar="SIZE",
                       help="RAM (default %(default)s)")
    start.add_argument("--disk", type=size, default="256MiB", metavar="SIZE",
                       help="disk (default %(default)s)")
    start.add_argument("--workload", default="oltp",
                       choices=["idle", "uniform", "hotset", "scan", "oltp"])
    start.add_argument("--rate", type=byte_rate, default="60MB/s", metavar="RATE",
                       help="page-write rate in bytes/s (default %(default)s)")
    start.add_argument("--disk-rate", type=byte_rate, default="4MB/s", metavar="RATE",
                       help="oltp disk-write rate in bytes/s (default %(default)s)")
    start.add_argument("--seed", type=int, default=1)
    start.add_argument("--udp", type=endpoint, metavar="HOST:PORT",
                       help="serve the guest's UDP key-value service there")
    start.add_argument("--json", action="store_true", help="events as JSON lines")
    start.set_defaults(func=_guest_start)
    for name, helptext in (("status", "print the host's and its guest's state"),
                           ("stop", "stop the guest (its host then exits)")):
        cmd = cmds.add_parser(name, help=helptext, description=helptext.capitalize() + ".")
        cmd.add_argument("--guest", required=True, type=Path, metavar="CTL",
                         help="the control socket DIR/NAME.ctl")
        cmd.add_argument("--json", action="store_true", help="one JSON object")
        cmd.set_defaults(func=_guest_request, op=name)


def _add_migrate(sub: Any) -> None:
    mig = sub.add_parser(
        "migrate", help="migrate a hosted guest to a destination agent",
        description="Ask the host of a guest (its control socket) to migrate it to the agent "
        "at HOST:PORT over mutually authenticated TLS, and show the progress: a live display "
        "on a terminal, JSON lines with --json, nothing otherwise; then the report. "
        "Exit status: 0 migrated; 2 bad input (flags, PKI, a path that is not what its flag "
        "needs), nothing asked of the destination; 3 not migrated or aborted (the source "
        "guest runs on); 4 in doubt: GO was given and the destination has not confirmed "
        "that the guest runs there (the source keeps its paused copy and keeps telling the "
        "destination until it answers).")
    which = mig.add_mutually_exclusive_group(required=True)
    which.add_argument("--guest", type=Path, metavar="CTL",
                       help="the control socket of a guest's host (xmig guest start)")
    which.add_argument("--qemu-qmp", type=Path, metavar="SOCKET",
                       help="a running QEMU's QMP socket: this process migrates it (the "
                       "agent needs --qemu-kernel/--qemu-initrd)")
    mig.add_argument("--workdir", type=Path, metavar="DIR",
                     help="with --qemu-qmp: the source's journal and mirror files (default: "
                     "SOCKET's directory/xmig)")
    mig.add_argument("--keep-source", action="store_true",
                     help="with --qemu-qmp: leave the source QEMU paused after the "
                     "migration (default: tell it to quit)")
    mig.add_argument("--to", required=True, type=endpoint, metavar="HOST:PORT")
    mig.add_argument("--pki", required=True, type=Path, metavar="DIR",
                     help="CA and client certificate (xmig certs init)")
    mig.add_argument("--server-name", help="the agent's certificate name (default: HOST)")
    mig.add_argument("--max-downtime", type=duration, default="300ms", metavar="DURATION",
                     help="downtime budget (default %(default)s)")
    mig.add_argument("--timeout", type=duration, default="300s", metavar="DURATION",
                     help="abandon a pre-copy not converged by then (default %(default)s)")
    mig.add_argument("--blackout-timeout", type=duration, default="10s", metavar="DURATION",
                     help="abort (the source runs on) when the guest has been paused this "
                     "long without the destination's READY (default %(default)s)")
    mig.add_argument("--connect-timeout", type=duration, default="10s", metavar="DURATION",
                     help="give up reaching the agent after this (default %(default)s)")
    mig.add_argument("--streams", type=positive, default=2, help="parallel TCP connections")
    mig.add_argument("--sdps", choices=["on", "off", "autoconverge"],
                     help="throttle a guest that outruns the link (default: on; with "
                     "--qemu-qmp off, where on is the vCPUs' cgroup CPU quota)")
    mig.add_argument("--no-sdps", dest="sdps", action="store_const", const="off",
                     help="same as --sdps off")
    mig.add_argument("--bandwidth", type=bit_rate, metavar="RATE",
                     help="cap the migration's data rate in bits/s, e.g. 500mbit")
    mig.add_argument("--link-rate", type=bit_rate, metavar="RATE",
                     help="the link's rate, for link_utilization (default: --bandwidth)")
    mig.add_argument("--no-verify", action="store_true",
                     help="skip the memory and disk digests in the blackout")
    mig.add_argument("--max-penalty", type=_fraction, metavar="FRACTION",
                     help="keep the guest's progress within this fraction of its pace "
                     "before the migration (e.g. 0.1), trading total time for it: the "
                     "one-time copy is paced and the SDPS throttle capped at it; a guest "
                     "that outruns the link at that throttle does not converge (reference "
                     "guests only: refused with --qemu-qmp, whose guest's progress xmig does "
                     "not read)")
    mig.add_argument("--plan", action="store_true",
                     help="do not migrate: measure the guest, then the link to the agent "
                     "(--plan-time each), and print the forecast: total time, downtime, "
                     "throttle and penalty, or why it would not converge and what would "
                     "(exit 0 converges, 3 would not)")
    mig.add_argument("--plan-time", type=duration, default="3s", metavar="DURATION",
                     help="with --plan: how long to measure each (default %(default)s, at "
                     "most 10s)")
    mig.add_argument("--json", action="store_true", help="events, then the report, as JSON")
    mig.add_argument("--plot", type=Path, metavar="FILE.png", help="timeline plot")
    mig.add_argument("--report", type=Path, metavar="FILE.json",
                     help="write the report (with its timeline)")
    mig.set_defaults(func=_migrate)


def _add_agent(sub: Any) -> None:
    agent = sub.add_parser(
        "agent", help="destination agent: receive migrations and host the guests",
        description="Listen for migrations (TLS, server certificate from --pki), receive "
        "each and host the guest that arrives like `xmig guest start` (control socket "
        "DIR/NAME.ctl). Without --once: until SIGTERM/SIGINT, which stop every hosted guest. "
        "With --once: one migration; exit 1 if it fails, else host that guest until it is "
        "stopped or migrated away.")
    agent.add_argument("--listen", required=True, type=endpoint, metavar="HOST:PORT",
                       help="port 0 picks one (printed in the ready line)")
    agent.add_argument("--pki", required=True, type=Path, metavar="DIR")
    agent.add_argument("--workdir", required=True, type=Path, metavar="DIR")
    agent.add_argument("--once", action="store_true")
    agent.add_argument("--qemu-kernel", type=Path, metavar="FILE",
                       help="accept QEMU guests: the kernel their QEMU boots with")
    agent.add_argument("--qemu-initrd", type=Path, metavar="FILE")
    agent.add_argument("--qemu-binary", default="qemu-system-x86_64", metavar="PATH")
    agent.add_argument("--max-ram", type=size, metavar="SIZE",
                       help="refuse a guest with more RAM than this, e.g. 4GiB (default: "
                       "derived from the host's free memory)")
    agent.add_argument("--max-disk", type=size, metavar="SIZE",
                       help="refuse a guest with a larger disk than this, e.g. 64GiB "
                       "(default: derived from the workdir's free space)")
    agent.add_argument("--allow", action="append", default=[], metavar="PATTERN",
                       help="take migrations only from a client certificate whose subject "
                       "DN (RFC 4514, e.g. 'CN=src*.example.net') or one of whose SANs "
                       "matches this glob (repeatable); default: every certificate the CA "
                       "signed")
    agent.add_argument("--json", action="store_true", help="events as JSON lines")
    agent.set_defaults(func=_agent)


# -- the hosting processes --------------------------------------------------------------


def _printer(as_json: bool) -> Any:
    def emit(event: dict[str, Any]) -> None:
        line = hostctl.encode(event).decode().rstrip() if as_json else _human(event)
        if line:
            print(line, flush=True)
    return emit


def _human(e: dict[str, Any]) -> str | None:
    kind, name = e.get("event"), e.get("name", "")
    if kind == "ready" and e.get("role") == "agent":
        return f"ready: agent listening on {e['listen']} (pid {e['pid']}), workdir {e['workdir']}"
    if kind == "ready":
        udp = f", UDP service {e['udp']}" if e.get("udp") else ""
        return (f"ready: guest {name} running (pid {e['guest_pid']}), control socket "
                f"{e['ctl']}{udp}")
    if kind == "migration-ended":
        return f"{name}: migration {e['status']}" + (f": {e['error']}" if e.get("error") else "")
    if kind == "phase" and "dir" in e:
        return f"incoming {Path(e['dir']).name}: {e['phase']}"
    text = {"migrating": f"{name}: migrating to {e.get('to')}",
            "exit": f"{name or 'agent'}: exit{' ' + e['state'] if e.get('state') else ''} "
                    f"(status {e.get('rc')})",
            "incoming": f"incoming migration from {e.get('peer')} into {e.get('dir')}",
            "discarded": f"incoming {Path(str(e.get('dir'))).name} discarded: {e.get('error')}",
            }.get(str(kind))
    return text or f"{kind}: " + json.dumps({k: v for k, v in e.items() if k != "event"})


def _guest_start(args: argparse.Namespace) -> int:
    from xmig.service.hostd import GuestSpec, start_source

    udp = hostctl.parse_endpoint(args.udp) if args.udp else None
    spec = GuestSpec(name=args.name, workdir=args.workdir, ram_bytes=args.ram,
                     disk_bytes=args.disk, workload=args.workload, rate_Bps=args.rate,
                     disk_rate_Bps=args.disk_rate, seed=args.seed, udp=udp)

    async def run() -> int:
        host = await start_source(spec, _printer(args.json))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, host.request_stop)
        return await host.serve()

    return asyncio.run(run())


def _agent(args: argparse.Namespace) -> int:
    from xmig.service.agentd import serve_agent

    host, port = hostctl.parse_endpoint(args.listen)
    qemu = None
    if args.qemu_kernel or args.qemu_initrd:
        from xmig.guest.qemu.machine import QemuConfig

        if not (args.qemu_kernel and args.qemu_initrd):
            raise ConfigError("--qemu-kernel and --qemu-initrd go together")
        for path in (args.qemu_kernel, args.qemu_initrd):
            if not path.is_file():
                raise ConfigError(f"{path}: no such file")
        qemu = QemuConfig(kernel=args.qemu_kernel.absolute(),
                          initrd=args.qemu_initrd.absolute(), append="",
                          qemu=args.qemu_binary)
    return asyncio.run(serve_agent(host=host, port=port, pki_dir=args.pki,
                                   workdir=args.workdir, once=args.once,
                                   emit=_printer(args.json), qemu=qemu,
                                   max_ram_bytes=args.max_ram, max_disk_bytes=args.max_disk,
                                   allow=tuple(args.allow)))


# -- the clients ------------------------------------------------------------------------


def _guest_request(args: argparse.Namespace) -> int:
    status = hostctl.request(args.guest, args.op)
    if args.json:
        print(json.dumps(status), flush=True)
        return 0
    console = Console()
    if args.op == "stop":
        console.print(f"guest {status.get('name')} stopped; its host exits")
        return 0
    m = status.get("migration")
    status["migration"] = f"{m.get('phase')} → {m.get('to')}" if isinstance(m, dict) else "—"
    for key in ("name", "role", "state", "guest_state", "workload", "ram_bytes", "disk_bytes",
                "progress", "progress_rate", "throttle", "udp", "ctl", "workdir",
                "guest_pid", "host_pid", "uptime_s", "migration"):
        console.print(f"[bold]{key:>13}[/] {status.get(key)}", highlight=False)
    return 0


def _red_line(err: XmigError) -> None:
    Console(stderr=True, soft_wrap=True).print(
        Text(f"xmig: {type(err).__name__}: {err}", style="bold red"))


def _migrate(args: argparse.Namespace) -> int:
    from xmig.transport.certs import PkiPaths

    if args.plan and not 0 < args.plan_time <= MAX_PROBE_S:
        raise ConfigError(f"--plan-time must be within (0, {MAX_PROBE_S:g}s], not "
                          f"{args.plan_time:g}s")
    pki = PkiPaths.in_dir(args.pki.absolute(), role="client")  # bad PKI: nothing asked yet
    if args.qemu_qmp is not None:
        return _migrate_qemu(args)
    req = hostctl.MigrateRequest(
        to=args.to, pki=str(pki.directory), server_name=args.server_name,
        max_downtime_s=args.max_downtime, timeout_s=args.timeout, streams=args.streams,
        sdps=args.sdps or "on", verify=not args.no_verify, bandwidth_bps=args.bandwidth,
        link_rate_bps=args.link_rate, connect_timeout_s=args.connect_timeout,
        blackout_timeout_s=args.blackout_timeout,
        plan_s=args.plan_time if args.plan else None, max_penalty=args.max_penalty)
    if args.plan:
        return _plan(args, req)
    try:
        return _run_migrate(args, req)
    except KeyboardInterrupt:
        Console(stderr=True).print("[yellow]interrupted: the migration goes on in the guest's "
                                   f"host (xmig guest status --guest {args.guest})[/]")
        raise


def _plan(args: argparse.Namespace, req: hostctl.MigrateRequest) -> int:
    """The forecast, rendered: one JSON object with --json, a few lines otherwise."""
    try:
        plan = hostctl.plan(args.guest, req, on_event=_printer(True) if args.json
                            else lambda e: None)
    except GuestNotFound:
        raise  # not a guest host's socket: bad input (2)
    except XmigError as err:
        _red_line(err)
        return EXIT_NOT_MIGRATED
    return _show_plan(args, plan)


def _show_plan(args: argparse.Namespace, plan: dict[str, Any]) -> int:
    if args.json:
        print(hostctl.encode(plan).decode().rstrip(), flush=True)
    else:
        Console().print(plan_summary(plan))
    return 0 if plan.get("converges") else EXIT_NOT_MIGRATED


def _run_migrate(args: argparse.Namespace, req: hostctl.MigrateRequest) -> int:
    console = Console()
    view = ProgressView(f"{args.guest.stem} → {args.to}", budget_s=args.max_downtime)
    if args.json:
        outcome = hostctl.migrate(args.guest, req, on_event=_printer(True))
    elif console.is_terminal:
        from rich.live import Live

        with Live(view.render(), console=console, refresh_per_second=4) as live:
            def show(event: dict[str, Any]) -> None:
                view.update(event)
                live.update(view.render())

            outcome = hostctl.migrate(args.guest, req, on_event=show)
    else:
        outcome = hostctl.migrate(args.guest, req)
    report = outcome.report
    if report is not None:
        if args.report:
            args.report.write_text(json.dumps(report, indent=1) + "\n")
        if args.plot:
            from xmig.harness.plot import plot_timeline

            plot_timeline(report, args.plot)
        if args.json:
            print(hostctl.encode({k: v for k, v in report.items() if k != "timeline"})
                  .decode().rstrip(), flush=True)
        elif console.is_terminal and outcome.error is None:
            console.print(summary(report))
    if outcome.error is not None:
        _red_line(outcome.error)
        if outcome.after_go:
            return EXIT_IN_DOUBT
        return EXIT_BAD_INPUT if isinstance(outcome.error, ConfigError) else EXIT_NOT_MIGRATED
    return 0


def _migrate_qemu(args: argparse.Namespace) -> int:
    from xmig.errors import MigrationAborted
    from xmig.guest.qemu.migrate import QemuMigrationOptions
    from xmig.service.qemusource import QemuMigrateRequest, migrate_attached

    options = QemuMigrationOptions(downtime_limit_ms=max(1, round(args.max_downtime * 1000)),
                                   timeout_s=args.timeout, sdps=args.sdps == "on",
                                   blackout_timeout_s=args.blackout_timeout)
    if args.sdps == "autoconverge":
        raise ConfigError("--sdps autoconverge is for reference guests (a QEMU has its own "
                          "auto-converge)")
    if args.max_penalty is not None:
        raise ConfigError("--max-penalty is for reference guests: xmig cannot read a QEMU "
                          "guest's progress")
    req = QemuMigrateRequest(
        qmp=args.qemu_qmp, to=args.to, pki=args.pki, server_name=args.server_name,
        workdir=args.workdir or args.qemu_qmp.absolute().parent / "xmig",
        streams=args.streams, bandwidth_bps=args.bandwidth,
        connect_timeout_s=args.connect_timeout, keep_source=args.keep_source, options=options)
    if args.plan:
        return _plan_qemu(args, req)
    console = Console()
    view = ProgressView(f"{args.qemu_qmp.name} → {args.to}", budget_s=args.max_downtime)
    render: Any = _printer(True) if args.json else (lambda e: None)
    asked = [False]  #: the destination was asked (connecting): errors are no longer input's

    def on_event(event: dict[str, Any]) -> None:
        asked[0] = asked[0] or event.get("event") == "connecting"
        render(event)

    try:
        if console.is_terminal and not args.json:
            from rich.live import Live

            with Live(view.render(), console=console, refresh_per_second=4) as live:
                def show(event: dict[str, Any]) -> None:
                    view.update(event)
                    live.update(view.render())

                render = show
                report = asyncio.run(migrate_attached(req, on_event))
        else:
            report = asyncio.run(migrate_attached(req, on_event))
    except MigrationAborted as err:
        cause = err.__cause__
        _red_line(cause if isinstance(cause, XmigError) else err)
        Console(stderr=True).print("[yellow]not migrated: the source QEMU runs on[/]")
        return EXIT_NOT_MIGRATED
    except XmigError as err:
        # before the destination was asked: the PKI, the socket (not QMP, nothing there) or
        # the QEMU at it (what xmig cannot migrate), the workdir: bad input, nothing changed
        _red_line(err)
        return EXIT_NOT_MIGRATED if asked[0] else EXIT_BAD_INPUT
    return _qemu_report(args, console, report)


def _plan_qemu(args: argparse.Namespace, req: Any) -> int:
    from xmig.service.qemusource import plan_attached

    asked = [False]  #: the agent was asked (connecting): errors are no longer input's

    def on_event(event: dict[str, Any]) -> None:
        asked[0] = asked[0] or event.get("event") == "connecting"
        if args.json:
            _printer(True)(event)

    try:
        plan = asyncio.run(plan_attached(req, args.plan_time, on_event))
    except XmigError as err:
        _red_line(err)
        return EXIT_NOT_MIGRATED if asked[0] else EXIT_BAD_INPUT
    return _show_plan(args, plan.to_json())


def _qemu_report(args: argparse.Namespace, console: Console, report: Report) -> int:
    data = report.to_json()
    if args.report:
        args.report.write_text(json.dumps(data, indent=1) + "\n")
    if args.json:
        print(hostctl.encode({k: v for k, v in data.items() if k != "timeline"})
              .decode().rstrip(), flush=True)
    elif console.is_terminal and report.status == "done":
        console.print(summary(data))
    if report.status == "aborted":  # the destination abandoned the epoch
        Console(stderr=True, soft_wrap=True).print(Text(
            f"xmig: {report.error}", style="bold red"))
        return EXIT_NOT_MIGRATED
    if report.status != "done":
        Console(stderr=True, soft_wrap=True).print(Text(
            f"xmig: InDoubt: {report.status}: {report.error} (the source QEMU stays "
            "paused)", style="bold red"))
        return EXIT_IN_DOUBT
    return 0
