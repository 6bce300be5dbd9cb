"""Helpers of the QEMU guest tests."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from xmig.transport import TransportSession, connect, listen

REPO = Path(__file__).resolve().parents[3]


def guest_build_dir() -> Path:
    """Where the test guest is built: ``$XMIG_GUEST_BUILD`` or the repository's build/guest."""
    return Path(os.environ.get("XMIG_GUEST_BUILD") or REPO / "build" / "guest")


@contextlib.asynccontextmanager
async def loopback_sessions() -> AsyncIterator[tuple[TransportSession, TransportSession]]:
    """A plaintext session on loopback: the source agent's end, the destination's."""
    async with (
        listen(tls=None, insecure_plaintext=True) as lst,
        connect("127.0.0.1", lst.port, tls=None, insecure_plaintext=True) as src,
    ):
        yield src, await lst.accept()
