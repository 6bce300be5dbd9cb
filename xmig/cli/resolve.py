"""``xmig resolve``: the migrations in doubt on this host, and an operator's forced side.

A migration is *in doubt* on a host when its commit protocol stopped between the two sides'
words: a source that journaled GO and has no confirmation keeps its guest paused; a
destination that said READY and never heard GO keeps its copy paused. Each side waits for
the other. When the other site is gone for good, an operator decides: ``--force go`` (the
destination runs the guest) or ``--force abort`` (the source does). The decision is
journaled (FORCED) where it is taken, and that side refuses the other's contrary decision
afterwards, typed. Forcing both sides the same way is the operator's part: xmig cannot
know what a lost site did.

The host's control sockets are found in ``--workdir``: ``agent.ctl`` (the agent, its
destination side) and each guest host's ``NAME.ctl`` (their source side).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from xmig.errors import ConfigError, GuestNotFound, XmigError
from xmig.service import hostctl

ROLES = ("source", "destination")


def add_parsers(sub: Any) -> None:
    res = sub.add_parser(
        "resolve", help="list migrations in doubt on this host; force a side",
        description="List the migrations in doubt on this host (both roles: guest hosts "
        "holding a paused guest after GO, an agent holding a paused copy after READY), "
        "found by their control sockets in --workdir. With --migration and --force, decide "
        "one (the other site is gone): go = the destination runs the guest, abort = the "
        "source does. It asks for confirmation (type the migration's name) unless --yes, "
        "journals the decision (FORCED) and refuses the other side's contrary decision "
        "afterwards. Exit 0 when done (or listed), 2 on a typed error (nothing changed), "
        "1 when the confirmation was not given.")
    res.add_argument("--workdir", required=True, type=Path, metavar="DIR",
                     help="where the agent's and the guest hosts' control sockets are")
    res.add_argument("--migration", metavar="NAME", help="the migration to decide")
    res.add_argument("--force", choices=hostctl.FORCES,
                     help="go: the destination runs it; abort: the source runs it")
    res.add_argument("--role", choices=ROLES,
                     help="which side here to decide, when both are in doubt on this host")
    res.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    res.add_argument("--json", action="store_true",
                     help="one JSON object per migration in doubt (or the result)")
    res.set_defaults(func=_resolve)


def in_doubt(workdir: Path) -> list[dict[str, Any]]:
    """Every migration in doubt that a control socket in ``workdir`` reports, each with the
    ``ctl`` that holds it. Sockets nobody answers at (stale) are skipped."""
    if not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is not a directory")
    found: list[dict[str, Any]] = []
    for ctl in sorted(workdir.glob("*.ctl")):
        try:
            status = hostctl.request(ctl, "status")
        except XmigError:
            continue
        doubts = status.get("in_doubt")
        for doubt in doubts if isinstance(doubts, list) else [doubts]:
            if isinstance(doubt, dict):
                found.append({**doubt, "ctl": str(ctl)})
    return found


def _resolve(args: argparse.Namespace) -> int:
    found = in_doubt(args.workdir)
    if args.migration is None and args.force is None:
        _show(found, args.json)
        return 0
    if args.migration is None or args.force is None:
        raise ConfigError("--force needs --migration, and --migration needs --force")
    chosen = [d for d in found if d.get("migration") == args.migration
              and args.role in (None, d.get("role"))]
    if not chosen:
        raise GuestNotFound(f"no migration {args.migration} is in doubt in {args.workdir}")
    if len(chosen) > 1:
        raise ConfigError(f"migration {args.migration} is in doubt here as both source and "
                          "destination: say which with --role")
    [doubt] = chosen
    if not args.yes and not _confirmed(doubt, args.force):
        Console(stderr=True).print("not confirmed: nothing changed")
        return 1
    status = hostctl.resolve(Path(doubt["ctl"]),
                             hostctl.ResolveRequest(args.migration, args.force))
    outcome = {"migration": args.migration, "role": doubt.get("role"), "forced": args.force,
               "epoch": doubt.get("epoch"), "state": status.get("state")}
    if args.json:
        print(json.dumps(outcome), flush=True)
    else:
        runs = "the destination" if args.force == "go" else "the source"
        Console().print(f"migration {args.migration} ({doubt.get('role')}, epoch "
                        f"{doubt.get('epoch')}): forced {args.force}, journaled; "
                        f"{runs} runs the guest", highlight=False)
    return 0


def _show(found: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        for doubt in found:
            print(json.dumps(doubt), flush=True)
        return
    console = Console()
    if not found:
        console.print("no migration is in doubt here")
        return
    for d in found:
        console.print(f"{d.get('migration')}  {d.get('role')}  epoch {d.get('epoch')}  "
                      f"{d.get('ctl')}", highlight=False)


def _confirmed(doubt: dict[str, Any], force: str) -> bool:
    if not sys.stdin.isatty():
        raise ConfigError("--force asks for confirmation on a terminal: pass --yes to "
                          "decide without one")
    other = "destination" if doubt.get("role") == "source" else "source"
    runs = "destination" if force == "go" else "source"
    print(f"Force {force} on migration {doubt.get('migration')} (this host is its "
          f"{doubt.get('role')}): the {runs} will run the guest. Make sure the {other} "
          "never does. Type the migration's name to confirm: ", end="", flush=True)
    return sys.stdin.readline().strip() == doubt.get("migration")
