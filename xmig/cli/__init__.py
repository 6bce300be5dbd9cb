"""The ``xmig`` command. It parses flags, calls the library and renders what it reports.

A typed :class:`~xmig.errors.XmigError` becomes one red line on stderr and exit status 2
(``xmig migrate`` tells bad input, 2, from a migration that did not happen, 3, or one in
doubt after GO, 4: :mod:`xmig.cli.ops`). Sizes, rates and durations are read by :mod:`xmig.units`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.text import Text

from xmig import __version__
from xmig.errors import XmigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xmig", description=__doc__)
    parser.add_argument("--version", action="version", version=f"xmig {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    from xmig.netem import cli as netem_cli
    from xmig.transport import cli as transport_cli

    transport_cli.add_parsers(sub)
    netem_cli.add_parsers(sub)
    from xmig.cli import demo as cli_demo
    from xmig.cli import ops as cli_ops
    from xmig.cli import resolve as cli_resolve

    cli_demo.add_parsers(sub)
    cli_ops.add_parsers(sub)
    cli_resolve.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        # a flag's value some commands check as a typed error (ConfigError) fails in here
        args = parser.parse_args(argv)
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
