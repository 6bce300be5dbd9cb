"""Entry point of a reference guest process: ``python -m xmig.guest.sim --control-fd N
--parent-pid P`` (started by :class:`xmig.guest.sim.SimGuest`, not by hand).

The process dies with its host: the kernel sends it SIGUSR1 when its parent thread exits
(``PR_SET_PDEATHSIG``; if the parent *process* is still there, it was only the thread and the
signal is ignored), and end of file on the control channel means the same. Orphaned, it
removes the shared files it created and exits.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import sys
from types import FrameType

from xmig.guest.sim.vcpu import GuestProcess, Orphaned

PR_SET_PDEATHSIG = 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xmig.guest.sim")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    parent = args.parent_pid

    def on_parent_death(_sig: int, _frame: FrameType | None) -> None:
        if os.getppid() != parent:
            raise Orphaned

    def on_term(_sig: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGUSR1, on_parent_death)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the host decides when its guests stop
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGUSR1, 0, 0, 0) != 0:
        print(f"prctl(PR_SET_PDEATHSIG): errno {ctypes.get_errno()}", file=sys.stderr)
    sock = socket.socket(fileno=args.control_fd)
    guest = GuestProcess(sock)
    if os.getppid() != parent:  # the host died before prctl
        return 0
    return guest.run()


if __name__ == "__main__":
    sys.exit(main())
