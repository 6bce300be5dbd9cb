"""CLI commands of the WAN emulator (``xmig netem``)."""

from __future__ import annotations

from typing import Any


def add_parsers(sub: Any) -> None:
    """Register this package's subcommands on the ``xmig`` parser."""
    netem = sub.add_parser("netem", help="emulate a WAN link between two network namespaces")
    netem.set_defaults(func=lambda args: netem.print_help())
