"""The write ledger: an append-only record of every disk write acknowledged to the guest.

File format: the 8-byte magic ``XSIMLDG1``, then fixed 32-byte little-endian records::

    u64 seq      acknowledged-write number (continues across a migration)
    u64 offset
    u32 length
    u32 reserved (0)
    u64 xxh3-64 of the data written

A record is appended only after the write was acknowledged, so the ledger never claims a
write the guest did not see acknowledged (it may miss the last few if the guest is killed).
:func:`verify_ledger` checks a disk against one or more ledgers, in order: every write not
overwritten by a later one must be on the disk as written.
"""

from __future__ import annotations

import math
import os
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

MAGIC = b"XSIMLDG1"
RECORD = struct.Struct("<QQIIQ")


@dataclass(frozen=True)
class LedgerEntry:
    """One acknowledged write."""

    seq: int
    offset: int
    length: int
    digest: int


class WriteLedger:
    """Appends records to a ledger file (created with its magic when missing or empty)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        if os.fstat(self._fd).st_size == 0:
            os.write(self._fd, MAGIC)
        self._pending: list[bytes] = []
        self._lock = threading.Lock()  # records come from the guest's I/O thread

    def record(self, seq: int, offset: int, data: bytes) -> None:
        """Note an acknowledged write (buffered until :meth:`flush`)."""
        rec = RECORD.pack(seq, offset, len(data), 0, xxhash.xxh3_64_intdigest(data))
        with self._lock:
            self._pending.append(rec)
            full = len(self._pending) >= 64
        if full:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                os.write(self._fd, b"".join(self._pending))
                self._pending.clear()

    def close(self) -> None:
        if self._fd >= 0:
            self.flush()
            os.close(self._fd)
            self._fd = -1


def read_ledger(path: Path) -> list[LedgerEntry]:
    """Every record in a ledger file (a torn last record is ignored)."""
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError(f"{path} is not a write ledger")
    body = data[len(MAGIC) :]
    usable = len(body) - len(body) % RECORD.size
    return [
        LedgerEntry(seq, offset, length, digest)
        for seq, offset, length, _res, digest in RECORD.iter_unpack(body[:usable])
    ]


@dataclass
class LedgerCheck:
    """What :func:`verify_ledger` found."""

    acknowledged: int = 0
    verified: int = 0
    superseded: int = 0
    """Writes (partly) overwritten by a later acknowledged write: not checkable, not lost."""
    lost: list[LedgerEntry] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.lost


def verify_ledger(
    entries: Iterable[LedgerEntry], pread: Callable[[int, int], bytes]
) -> LedgerCheck:
    """Check acknowledged writes (oldest first) against a disk read through ``pread``."""
    ordered = list(entries)
    check = LedgerCheck(acknowledged=len(ordered))
    grain = 0
    for e in ordered:
        grain = math.gcd(grain, e.offset, e.length)
    grain = max(grain, 1)
    covered: set[int] = set()
    for e in reversed(ordered):
        units = range(e.offset // grain, (e.offset + e.length) // grain)
        if any(u in covered for u in units):
            check.superseded += 1
        elif xxhash.xxh3_64_intdigest(pread(e.offset, e.length)) == e.digest:
            check.verified += 1
        else:
            check.lost.append(e)
        covered.update(units)
    return check
