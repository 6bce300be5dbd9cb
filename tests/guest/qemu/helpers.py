"""Helpers of the QEMU guest tests."""

from __future__ import annotations

import contextlib
import os
import signal
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


def qemus_under(path: Path) -> list[int]:
    """The QEMU processes whose command line names a file under ``path``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-system-x86_64") and any(
                str(path).encode() in arg for arg in argv):
            found.append(int(proc.name))
    return found


def kill_qemus_under(path: Path) -> list[int]:
    """Kill (SIGKILL) every QEMU whose command line names a file under ``path``: the
    children of an agent that a test killed as a power loss would (they outlive it here)."""
    killed = []
    for pid in qemus_under(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed
