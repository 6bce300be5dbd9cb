"""The downtime budget of a QEMU migration, split. Sans-IO.

``--max-downtime`` is the whole pause-to-resume the operator allows, as for the reference
guest. QEMU's own ``downtime-limit`` covers only its last pass (the RAM still dirty when it
stops the vCPUs, over its measured bandwidth); after it, xmig's commit takes its own time:
the last bytes and READY cross the link and GO crosses back (1.5 × srtt), the destination
hashes its RAM to check the stream (:mod:`~xmig.guest.qemu.ramcheck`), and each side fsyncs
its journal record (GO, RUNNING). So QEMU is given the budget less that reserve, never less
than :data:`MIN_LIMIT_MS`; a budget smaller than the reserve cannot be kept, and the split
says so (``fits``) rather than pretending.
"""

from __future__ import annotations

from dataclasses import dataclass

#: the destination's RAM hashing, bytes/s: xxh3 over a mapping runs at 4-8 GB/s here; half
#: that on a busy host
HASH_Bps = 2e9
JOURNAL_S = 0.02  #: GO's and RUNNING's fsyncs
MIN_LIMIT_MS = 20  #: QEMU's last pass is given at least this


@dataclass(frozen=True)
class DowntimeSplit:
    """How the budget is spent: QEMU's last pass, then the commit's reserve."""

    budget_ms: int
    qemu_limit_ms: int  #: QEMU's ``downtime-limit``
    reserve_ms: int  #: round trips, the RAM check, the journal fsyncs
    fits: bool  #: whether the reserve leaves QEMU anything of the budget


def split_budget(budget_ms: int, *, srtt_s: float | None, ram_bytes: int) -> DowntimeSplit:
    """Split ``budget_ms`` for a guest of ``ram_bytes`` over a link of round trip
    ``srtt_s`` (None: not measured yet, counted as 0)."""
    reserve_ms = round((1.5 * (srtt_s or 0.0) + ram_bytes / HASH_Bps + JOURNAL_S) * 1000)
    left = budget_ms - reserve_ms
    return DowntimeSplit(budget_ms=budget_ms, qemu_limit_ms=max(MIN_LIMIT_MS, left),
                         reserve_ms=reserve_ms, fits=left >= MIN_LIMIT_MS)
