"""The test guest's disk records: what its disk writer puts on the disk, and a checker.

Record ``k`` (``bs`` bytes, a multiple of 512) sits at offset ``(k mod n) × bs`` where ``n =
area // bs``; its 64-bit little-endian words are ``"XMIGREC1"``, ``k``, ``bs``, then
``mix(k << 24 | i)`` for word ``i ≥ 3`` (splitmix64's finaliser, as in ``workload.c``). The
content is a function of ``k`` alone, so a torn, lost or misplaced write shows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

MAGIC = int.from_bytes(b"XMIGREC1", "little")
_U64 = npt.NDArray[np.uint64]


def _mix(x: _U64) -> _U64:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def record_bytes(seq: int, bs: int = 4096) -> bytes:
    """The ``bs`` bytes the guest writes as record ``seq``."""
    return bytes(_expected(np.array([seq], dtype=np.uint64), bs).tobytes())


def _expected(seqs: _U64, bs: int) -> _U64:
    words = bs // 8
    index = np.arange(words, dtype=np.uint64)
    out = _mix((seqs[:, None] << np.uint64(24)) | index[None, :])
    out[:, 0] = MAGIC
    out[:, 1] = seqs
    out[:, 2] = bs
    return out


@dataclass(frozen=True)
class RecordCheck:
    """Records ``first .. disk_seq-1`` each found in their slot, intact (or overwritten by a
    later intact record); ``bad`` lists the sequence numbers that were not (first 20)."""

    disk_seq: int
    first: int
    checked: int
    bad: tuple[int, ...]
    bad_count: int
    newest: int  # highest intact record seen in the area (-1: none)

    @property
    def ok(self) -> bool:
        return self.bad_count == 0


def check_records(
    image: str | os.PathLike[str], disk_seq: int, bs: int = 4096, area: int | None = None
) -> RecordCheck:
    """Check that the records the guest reported written (``disk_seq`` of them) are on the
    raw image ``image``; ``area`` is the guest's ``disk_mb`` in bytes (None: the whole file)."""
    if bs < 512 or bs % 512:
        raise ValueError(f"record size {bs} is not a multiple of 512")
    path = Path(image)
    size = path.stat().st_size if area is None else area
    slots = size // bs
    if slots == 0:
        raise ValueError(f"{path}: no room for a {bs}-byte record")
    seq_in_slot = np.full(slots, -1, dtype=np.int64)  # intact record per slot, else -1
    step = max(1, (8 << 20) // bs)
    with open(path, "rb") as disk:
        for start in range(0, slots, step):
            count = min(step, slots - start)
            raw = disk.read(count * bs)
            raw += b"\0" * (count * bs - len(raw))
            words = np.frombuffer(raw, dtype="<u8").reshape(count, bs // 8).astype(np.uint64)
            seqs = words[:, 1]
            slot_ids = np.arange(start, start + count, dtype=np.uint64)
            plausible = (
                (words[:, 0] == MAGIC)
                & (words[:, 2] == bs)
                & (seqs < np.uint64(1 << 40))
                & (seqs % np.uint64(slots) == slot_ids)
            )
            intact = plausible.copy()
            idx = np.flatnonzero(plausible)
            if idx.size:
                same = (words[idx] == _expected(seqs[idx], bs)).all(axis=1)
                intact[idx] = same
            seq_in_slot[start : start + count] = np.where(intact, seqs.astype(np.int64), -1)
    first = max(0, disk_seq - slots)
    wanted = np.arange(first, disk_seq, dtype=np.int64)
    found = seq_in_slot[wanted % slots]
    missing = wanted[found < wanted]
    return RecordCheck(
        disk_seq=disk_seq,
        first=first,
        checked=int(wanted.size),
        bad=tuple(int(s) for s in missing[:20]),
        bad_count=int(missing.size),
        newest=int(seq_in_slot.max()) if slots else -1,
    )
