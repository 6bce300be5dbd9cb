"""The test guest's serial console: its progress lines, and a tail of the console's log file.

The workload (``workload.c``) prints, every ``report_ms``::

    XMIG counter=C up_ms=T mem_pass=P mem_pages=N disk_seq=S cpu=K

``counter`` grows by one per work unit (a page dirtied, a disk record acknowledged, a block of
4096 CPU iterations); ``up_ms`` is the guest's CLOCK_MONOTONIC (it does not advance while QEMU is
stopped); ``disk_seq`` counts the records the disk has acknowledged (records ``0 .. disk_seq-1``
are on the disk: :mod:`xmig.guest.qemu.records`). ``XMIG error …`` lines report a failure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

PAGE = 4096
_LINE = re.compile(
    rb"XMIG counter=(\d+) up_ms=(\d+) mem_pass=(\d+) mem_pages=(\d+) disk_seq=(\d+) cpu=(\d+)"
)
_ERROR = re.compile(rb"XMIG error (.*)")


@dataclass(frozen=True)
class Progress:
    """One progress line; ``at`` is the host's ``time.monotonic()`` when it was read."""

    counter: int
    up_ms: int
    mem_pass: int
    mem_pages: int
    disk_seq: int
    cpu: int
    at: float = 0.0

    def rates(self, earlier: Progress) -> dict[str, float]:
        """Rates between ``earlier`` and this line over the guest's own clock: ``counter_s``,
        ``mem_MiB_s`` (pages dirtied × 4 KiB), ``disk_records_s``."""
        dt = (self.up_ms - earlier.up_ms) / 1000.0
        if dt <= 0:
            return {"counter_s": 0.0, "mem_MiB_s": 0.0, "disk_records_s": 0.0}
        return {
            "counter_s": (self.counter - earlier.counter) / dt,
            "mem_MiB_s": (self.mem_pages - earlier.mem_pages) * PAGE / dt / (1 << 20),
            "disk_records_s": (self.disk_seq - earlier.disk_seq) / dt,
        }


def parse_progress(line: bytes, at: float = 0.0) -> Progress | None:
    """The progress line in ``line``, or None."""
    found = _LINE.search(line)
    if found is None:
        return None
    counter, up_ms, mem_pass, mem_pages, disk_seq, cpu = (int(v) for v in found.groups())
    return Progress(counter, up_ms, mem_pass, mem_pages, disk_seq, cpu, at=at)


def parse_error(line: bytes) -> str | None:
    """The message of an ``XMIG error`` line, or None."""
    found = _ERROR.search(line)
    return found.group(1).decode(errors="replace").strip() if found else None


class SerialTail:
    """Reads the lines appended to a console log file since the last read (a partial last
    line is kept for the next read). The file may not exist yet."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def read_lines(self) -> list[bytes]:
        try:
            with open(self.path, "rb") as log:
                log.seek(self._offset)
                data = log.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        return [line.rstrip(b"\r") for line in lines]
