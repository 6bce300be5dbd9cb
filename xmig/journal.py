"""A migration's journal: an append-only file of decisions, each fsynced before it counts.

The commit protocol (``xmig.switchover``) journals GO on the source before sending it, and
READY / RUNNING / DISCARDED on the destination; after a crash the last record says what
the side may do (a source that journaled GO never resumes its guest). One JSON object per
line; a torn last line (crash mid-write) is ignored, an unreadable middle line is an error.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xmig.errors import ConfigError


@dataclass(frozen=True)
class Record:
    kind: str  #: e.g. "GO", "ABORT", "READY", "RUNNING", "DISCARDED", "START"
    migration: str
    epoch: int
    at: float
    fields: dict[str, Any]


class Journal:
    """The journal file at ``path`` (created, with its directory, on first write)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, kind: str, migration: str, epoch: int, **fields: Any) -> Record:
        """Write one record and make it durable (file and directory fsync)."""
        rec = Record(kind, migration, epoch, time.time(), fields)
        line = json.dumps({"kind": kind, "migration": migration, "epoch": epoch,
                           "at": rec.at, **fields}, sort_keys=True) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return rec

    def records(self) -> list[Record]:
        """Every complete record, oldest first."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        lines = text.split("\n")
        out = []
        for i, line in enumerate(lines):
            if not line:
                continue
            try:
                body = json.loads(line)
                kind, mig, epoch, at = body.pop("kind"), body.pop("migration"), \
                    body.pop("epoch"), body.pop("at")
            except (ValueError, KeyError) as err:
                if i == len(lines) - 1:  # torn final write: it never counted
                    break
                raise ConfigError(f"{self.path}:{i + 1}: unreadable journal record") from err
            out.append(Record(str(kind), str(mig), int(epoch), float(at), body))
        return out

    def last(self, migration: str) -> Record | None:
        """The latest decision recorded for ``migration``."""
        recs = [r for r in self.records() if r.migration == migration]
        return recs[-1] if recs else None

    def next_epoch(self) -> int:
        """An epoch above every one this journal has seen (epochs only grow: fencing)."""
        return max((r.epoch for r in self.records()), default=0) + 1
