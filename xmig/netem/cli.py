"""CLI commands of the WAN emulator (``xmig netem``).

::

    xmig netem up --rate 1gbit --rtt 200ms [--loss 0.1%] [--queue 4MiB] [--name wan]
    xmig netem set --name wan [--rate 100mbit] [--rtt 50ms] [--loss 0] [--queue BYTES]
    xmig netem cut --name wan          # drop every packet (a cable pull)
    xmig netem restore --name wan
    xmig netem stats --name wan        # JSON counters per direction
    xmig netem down --name wan         # stop a running link, or remove leftovers of a dead one

``up`` builds the link in the foreground (root): network namespaces ``NAME-src`` and
``NAME-dst`` (so ``ip netns exec NAME-src ...`` runs a program on the src host), prints their
addresses and a last line starting with ``ready``, and serves requests on the unix socket
``/run/xmig-netem/NAME.sock`` until SIGINT or SIGTERM, when it removes everything it made.
A link whose ``up`` process was killed leaves its two (empty) named namespaces behind: the
next ``up`` or ``down`` of the same name removes them. Bad flags are a ConfigError (exit 2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import selectors
import signal
import socket
from typing import Any

from xmig.errors import ConfigError, NetemError, NetemPermissionError
from xmig.netem.spec import LinkSpec
from xmig.units import argtype, parse_bit_rate, parse_duration, parse_fraction, parse_size

RUN_DIR = "/run/xmig-netem"
DEFAULT_NAME = "xmig"
CLIENT_TIMEOUT_S = 15.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,30}")
_UNSET: Any = object()  #: --rate and --queue not given (None is a value of theirs)


def socket_path(name: str) -> str:
    """The control socket of link ``name``."""
    return os.path.join(RUN_DIR, f"{name}.sock")


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ConfigError(f"bad link name {name!r}: letters, digits, '.', '_', '-'; max 31")
    return name


def parse_link_rate(text: str) -> int | None:
    """A link rate (:func:`~xmig.units.parse_bit_rate`), or None (unshaped) for ``none``,
    ``unshaped`` or ``0``."""
    return None if text.strip().lower() in ("none", "unshaped", "0") else parse_bit_rate(text)


def parse_queue(text: str) -> int | None:
    """A queue bound (:func:`~xmig.units.parse_size`), or None (one BDP) for ``auto``."""
    return None if text.strip().lower() == "auto" else parse_size(text)


# -- client side ---------------------------------------------------------------------------


def request(name: str, op: str, **fields: Any) -> dict[str, Any]:
    """Send one request to the ``up`` process of link ``name``; return its answer."""
    path = socket_path(_check_name(name))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CLIENT_TIMEOUT_S)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as err:
            raise NetemError(f"no link named {name!r} is up ({path}: {err.strerror})") from err
        sock.sendall((json.dumps({"op": op, **fields}) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise NetemError(f"link {name!r} closed the control connection")
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    if not answer.get("ok"):
        cls = ConfigError if answer.get("type") == "ConfigError" else NetemError
        raise cls(str(answer.get("error")))
    return answer


def _link_alive(name: str) -> bool:
    try:
        request(name, "ping")
    except (NetemError, OSError, ValueError):
        return False
    return True


def sweep(name: str) -> list[str]:
    """Remove what a dead ``up`` of link ``name`` left behind; say what was removed."""
    from xmig.netem.tunlink import sweep_named

    removed = sweep_named(name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path(name))
        removed.append(socket_path(name))
    return removed


# -- server side ---------------------------------------------------------------------------


def _spec_from(args: argparse.Namespace, base: LinkSpec | None) -> LinkSpec:
    fields = base.to_dict() if base is not None else LinkSpec(None, 0.0, 0.0).to_dict()
    fields.update(_changes(args))
    return LinkSpec.from_dict(fields)


def _changes(args: argparse.Namespace) -> dict[str, Any]:
    """The LinkSpec fields the flags set (parsed by argparse, with :mod:`xmig.units`)."""
    changes: dict[str, Any] = {}
    if args.rate is not _UNSET:
        changes["rate_bps"] = args.rate
    if args.rtt is not None:
        changes["delay_fwd_s"] = changes["delay_rev_s"] = args.rtt / 2
    if args.delay_fwd is not None:
        changes["delay_fwd_s"] = args.delay_fwd
    if args.delay_rev is not None:
        changes["delay_rev_s"] = args.delay_rev
    if args.loss is not None:
        changes["loss"] = args.loss
    if args.queue is not _UNSET:
        changes["queue_bytes"] = args.queue
    if args.seed is not None:
        changes["seed"] = args.seed
    return changes


def _handle(link: Any, message: dict[str, Any]) -> dict[str, Any]:
    op = message.get("op")
    if op == "ping":
        return {"pid": os.getpid()}
    if op == "cut":
        link.cut()
        return {}
    if op == "restore":
        link.restore()
        return {}
    if op == "stats":
        return {"stats": link.stats()}
    if op == "set":
        spec = LinkSpec.from_dict({**link.spec.to_dict(), **message.get("changes", {})})
        link.set(spec)
        return {"spec": spec.to_dict(), "describe": spec.describe()}
    raise ConfigError(f"unknown request {op!r}")


def _serve_one(conn: socket.socket, link: Any) -> bool:
    """Answer one request on ``conn``; True if it asked the link to go down."""
    conn.settimeout(5)
    down = False
    answer: dict[str, Any]
    with conn:
        try:
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    return False
                data += chunk
            message = json.loads(data)
            if message.get("op") == "down":
                down, answer = True, {"ok": True}
            else:
                answer = {"ok": True, **_handle(link, message)}
        except (NetemError, ConfigError, ValueError, TypeError) as err:
            answer = {"ok": False, "type": type(err).__name__, "error": str(err)}
        except OSError:
            return False
        with contextlib.suppress(OSError):
            conn.sendall((json.dumps(answer) + "\n").encode())
    return down


def cmd_up(args: argparse.Namespace) -> int:
    from xmig.netem.link import Wan, tun_available

    name = _check_name(args.name)
    spec = _spec_from(args, None)
    if not tun_available():
        raise NetemPermissionError("xmig netem up needs root and /dev/net/tun")
    os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
    if _link_alive(name):
        raise NetemError(f"a link named {name!r} is up already ({socket_path(name)})")
    for item in sweep(name):
        print(f"removed leftover {item}", flush=True)

    stop = {"signal": 0}
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def on_signal(signum: int, _frame: Any) -> None:
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    old_wakeup = signal.set_wakeup_fd(wake_w)
    link = Wan(spec, fallback="tun", name=name)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        link.start()
        server.bind(socket_path(name))
        os.chmod(socket_path(name), 0o600)
        server.listen(16)
        print(f"xmig netem {name}: {spec.describe()}", flush=True)
        print(f"  src  {name}-src  {link.src_addr}  (ip netns exec {name}-src ...)")
        print(f"  dst  {name}-dst  {link.dst_addr}  (ip netns exec {name}-dst ...)")
        print(f"  control {socket_path(name)}  emulator pid {link.link.emulator_pid}")
        print(f"ready {name} src={link.src_addr} dst={link.dst_addr}", flush=True)
        with selectors.DefaultSelector() as sel:
            sel.register(server, selectors.EVENT_READ)
            sel.register(wake_r, selectors.EVENT_READ)
            while not stop["signal"]:
                for key, _ in sel.select():
                    if key.fileobj is server:
                        conn, _ = server.accept()
                        if _serve_one(conn, link):
                            stop["signal"] = signal.SIGTERM
                    else:
                        with contextlib.suppress(BlockingIOError):
                            os.read(wake_r, 512)
        print(f"xmig netem {name}: tearing down", flush=True)
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path(name))
        link.close()
        signal.set_wakeup_fd(old_wakeup)
        for signum, handler in old_handlers.items():
            signal.signal(signum, handler)
        os.close(wake_r)
        os.close(wake_w)
    return 0


# -- commands ------------------------------------------------------------------------------


def cmd_set(args: argparse.Namespace) -> int:
    changes = _changes(args)
    if not changes:
        raise ConfigError("nothing to set: give --rate, --rtt, --delay-fwd/rev, --loss or --queue")
    answer = request(args.name, "set", changes=changes)
    print(f"{args.name}: {answer['describe']}")
    return 0


def cmd_simple(args: argparse.Namespace) -> int:
    answer = request(args.name, args.netem_command)
    if args.netem_command == "stats":
        print(json.dumps(answer["stats"], indent=2, sort_keys=True))
    else:
        print(f"{args.name}: {args.netem_command} done")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    name = _check_name(args.name)
    if _link_alive(name):
        request(name, "down")
        print(f"{name}: asked to go down")
        return 0
    removed = sweep(name)
    left = f"removed {', '.join(removed)}" if removed else "nothing left"
    print(f"{name}: not running; {left}")
    return 0


def _link_flags(parser: argparse.ArgumentParser) -> None:
    """The link's flags; a bad value is a ConfigError naming the flag (one red line)."""
    parser.add_argument("--rate", type=argtype(parse_link_rate, flag="--rate"), default=_UNSET,
                        metavar="RATE",
                        help="link rate in bits/s: 1gbit, 100mbit, 500kbit, 1e9; none = unshaped")
    parser.add_argument("--rtt", type=argtype(parse_duration, flag="--rtt"),
                        metavar="DURATION", help="round-trip time, split evenly: 200ms, 1.5s")
    parser.add_argument("--delay-fwd", type=argtype(parse_duration, flag="--delay-fwd"),
                        metavar="DURATION",
                        help="one-way delay src -> dst (overrides --rtt's half)")
    parser.add_argument("--delay-rev", type=argtype(parse_duration, flag="--delay-rev"),
                        metavar="DURATION", help="one-way delay dst -> src")
    parser.add_argument("--loss", type=argtype(parse_fraction, flag="--loss"),
                        metavar="FRACTION", help="random loss per direction: 0.1%% or 0.001")
    parser.add_argument("--queue", type=argtype(parse_queue, flag="--queue"), default=_UNSET,
                        metavar="SIZE", help="queue bound per direction: a size such as "
                        "4MiB or 262144 (bytes); auto: one bandwidth-delay product, at least "
                        "256KiB")
    parser.add_argument("--seed", type=int, help="seed of the loss RNG")


def add_parsers(sub: Any) -> None:
    """Register this package's subcommands on the ``xmig`` parser."""
    netem = sub.add_parser(
        "netem",
        help="emulate a WAN link between two network namespaces",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    netem.set_defaults(func=lambda args: netem.print_help())
    commands = netem.add_subparsers(dest="netem_command")

    up = commands.add_parser("up", help="build a link and serve it in the foreground (root)")
    _link_flags(up)
    up.add_argument("--name", default=DEFAULT_NAME, help="link name (namespaces NAME-src/dst)")
    up.set_defaults(func=cmd_up)

    change = commands.add_parser("set", help="change a running link's parameters")
    _link_flags(change)
    change.add_argument("--name", default=DEFAULT_NAME)
    change.set_defaults(func=cmd_set)

    for command, text in (
        ("cut", "drop every packet until restore"),
        ("restore", "end a cut"),
        ("stats", "print the link's counters as JSON"),
    ):
        parser = commands.add_parser(command, help=text)
        parser.add_argument("--name", default=DEFAULT_NAME)
        parser.set_defaults(func=cmd_simple)

    down = commands.add_parser("down", help="stop a link, or remove a dead link's leftovers")
    down.add_argument("--name", default=DEFAULT_NAME)
    down.set_defaults(func=cmd_down)
