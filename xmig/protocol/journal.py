"""A migration's journal: an append-only file of decisions, each fsynced before it counts.

The commit protocol (``xmig.protocol.switchover``) journals GO on the source before sending it, and
READY / RUNNING / DISCARDED on the destination; after a crash the last record says what
the side may do (a source that journaled GO never resumes its guest). One JSON object per
line; a torn last line (crash mid-write) is ignored, an unreadable middle line is an error.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xmig.errors import ConfigError
from xmig.private import fsync_dir

log = logging.getLogger(__name__)


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
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._drop_torn_tail(fd)
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            fsync_dir(self.path.parent)
        return rec

    def append_or_log(self, kind: str, migration: str, epoch: int, **fields: Any) -> bool:
        """:meth:`append`, or False (logged) when the disk refuses the record (full, an I/O
        error): for a record the caller writes again once it has made room."""
        try:
            self.append(kind, migration, epoch, **fields)
        except OSError as err:
            log.warning("%s: %s not journaled yet: %s", self.path, kind, err)
            return False
        return True

    def _drop_torn_tail(self, fd: int) -> None:
        """A crash mid-write leaves a last line without its newline: it never counted, and
        appending after it would glue the next record to it. Cut it off (logged)."""
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        start = max(0, size - 65536)
        tail = os.pread(fd, size - start, start)
        keep = start + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
        log.warning("%s: dropping a torn last record (%d bytes)", self.path, size - keep)
        os.ftruncate(fd, keep)

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
