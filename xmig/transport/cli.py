"""CLI commands of the transport package (``xmig certs``)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parsers(sub: Any) -> None:
    """Register this package's subcommands on the ``xmig`` parser."""
    certs = sub.add_parser("certs", help="manage the TLS certificates agents use")
    certs.set_defaults(func=lambda args: certs.print_help())
    _ = argparse  # filled in by the certificates work
