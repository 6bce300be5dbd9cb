"""Helpers of the QEMU guest tests."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def guest_build_dir() -> Path:
    """Where the test guest is built: ``$XMIG_GUEST_BUILD`` or the repository's build/guest."""
    return Path(os.environ.get("XMIG_GUEST_BUILD") or REPO / "build" / "guest")
