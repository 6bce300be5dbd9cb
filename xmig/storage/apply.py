"""The destination side of disk migration: apply bulk extents and mirrored writes to the
destination image. Synchronous (pwrite); :mod:`xmig.storage.engine` drives it.

Fencing (I3): a message whose epoch is older than the applier's is refused with
:class:`~xmig.errors.StaleEpochError` before anything of it is written; a newer epoch is
adopted (the highest epoch seen wins, as a fencing token does). Every range is checked
before anything is written.

Bulk and mirror arrive on two channels, so their relative order is not kept in transit.
The source clips mirrored writes at the bulk cursor (:mod:`xmig.storage.mirror`), so every
mirrored byte is newer than the bulk copy of that byte; a bulk extent must therefore not
overwrite bytes a mirrored write already put there. The applier remembers the ranges
mirrored writes touched ahead of the bulk position (a few, while bulk extents are in
flight) and writes each bulk extent around them.

Sparse: zero parts of bulk extents are not written on a ``fresh`` image (known to read as
zeros, e.g. just made by :meth:`RawFileBackend.create`); otherwise they are punched.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from xmig.digest import ChunkDigests
from xmig.errors import DiskTooSmall, StaleEpochError, StorageError
from xmig.storage.disk import BlockBackend
from xmig.storage.nbd import ZeroingBackend, zero_chunks
from xmig.storage.wire import BulkDone, BulkExtent, Data, Hello, MirrorBatch, Ready


class RangeSet:
    """Disjoint, sorted half-open byte ranges."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __len__(self) -> int:
        return len(self._starts)

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        i = bisect.bisect_left(self._ends, start)  # first range ending at/after start
        j = bisect.bisect_right(self._starts, end)  # ranges starting after end stay
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def drop_below(self, pos: int) -> None:
        """Forget everything below ``pos``."""
        i = bisect.bisect_right(self._ends, pos)
        del self._starts[:i]
        del self._ends[:i]
        if self._starts and self._starts[0] < pos:
            self._starts[0] = pos

    def gaps(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """The parts of ``[start, end)`` not covered."""
        i = bisect.bisect_right(self._ends, start)
        pos = start
        while i < len(self._starts) and self._starts[i] < end:
            if self._starts[i] > pos:
                yield pos, self._starts[i]
            pos = max(pos, self._ends[i])
            i += 1
        if pos < end:
            yield pos, end


class DiskApplier:
    """Writes one destination image; ``epoch`` is this migration's (fencing)."""

    def __init__(self, image: BlockBackend, *, epoch: int, fresh: bool = False) -> None:
        self.image = image
        self.epoch = epoch
        self.fresh = fresh
        self.source_size: int | None = None
        self.bulk_pos = 0  #: every bulk extent below this is written
        self.bulk_done = False
        self.applied_seq = 0  #: every mirror write up to this seq is written
        self.bytes_written = 0
        self.mirror_writes = 0
        self._ahead = RangeSet()  # mirrored ranges at or above bulk_pos

    def _check_epoch(self, epoch: int) -> None:
        """Refuse ``epoch`` if older (nothing changes)."""
        if epoch < self.epoch:
            raise StaleEpochError(f"disk write of epoch {epoch} refused: this destination "
                                  f"is at epoch {self.epoch}", epoch=epoch, current=self.epoch)

    def fence(self, epoch: int) -> None:
        """Refuse ``epoch`` if older; adopt it if newer."""
        self._check_epoch(epoch)
        self.epoch = epoch

    # Each message below is checked whole (its epoch too) before anything changes: a bad
    # one raises and leaves the applier, its epoch and the image as they were.

    def hello(self, msg: Hello) -> Ready:
        self._check_epoch(msg.epoch)
        if self.image.size < msg.size:
            raise DiskTooSmall(f"destination image of {self.image.size} bytes cannot hold "
                               f"the source disk of {msg.size} bytes")
        self.epoch = msg.epoch
        self.source_size = msg.size
        return Ready(self.epoch, self.image.size)

    def _size(self) -> int:
        if self.source_size is None:
            raise StorageError("disk data before Hello")
        return self.source_size

    def apply_bulk(self, msg: BulkExtent) -> None:
        size = self._size()
        self._check_epoch(msg.epoch)
        if msg.start != self.bulk_pos or msg.end > size or msg.end < msg.start:
            raise StorageError(f"bulk extent [{msg.start}, {msg.end}) out of order "
                               f"(at {self.bulk_pos}, disk {size})")
        pos = msg.start
        for off, data in msg.runs:  # ascending, not overlapping, inside the extent
            if off < pos or off + len(data) > msg.end:
                raise StorageError(f"bulk run {off}+{len(data)} out of order or outside "
                                   f"[{msg.start}, {msg.end})")
            pos = off + len(data)
        self.epoch = msg.epoch
        pos = msg.start
        for off, data in msg.runs:
            self._zero_around(pos, off)
            self._write_around(off, data)
            pos = off + len(data)
        self._zero_around(pos, msg.end)
        self.bulk_pos = msg.end
        self._ahead.drop_below(self.bulk_pos)

    def apply_done(self, msg: BulkDone) -> None:
        self._check_epoch(msg.epoch)
        if msg.size != self._size() or self.bulk_pos != msg.size:
            raise StorageError(f"bulk copy ended at {self.bulk_pos} of {msg.size}")
        self.epoch = msg.epoch
        self.bulk_done = True
        self._ahead = RangeSet()

    def apply_mirror(self, msg: MirrorBatch) -> None:
        size = self._size()
        self._check_epoch(msg.epoch)
        seq = self.applied_seq
        for r in msg.records:
            if r.seq != seq + 1 or r.offset + r.length > size or (
                    r.data is not None and len(r.data) != r.length):
                raise StorageError(f"mirror write seq {r.seq} ({r.offset}+{r.length}) "
                                   f"invalid after seq {seq} on a disk of {size}")
            seq = r.seq
        self.epoch = msg.epoch
        for r in msg.records:
            if r.data is None:
                self._zero(r.offset, r.offset + r.length)
            else:
                self.image.pwrite(r.offset, r.data)
                self.bytes_written += r.length
            if not self.bulk_done:
                self._ahead.add(max(r.offset, self.bulk_pos), r.offset + r.length)
            self.applied_seq = r.seq
            self.mirror_writes += 1

    def _write_around(self, off: int, data: Data) -> None:
        view = memoryview(data)
        for a, b in self._ahead.gaps(off, off + len(view)):
            self.image.pwrite(a, view[a - off:b - off])
            self.bytes_written += b - a

    def _zero_around(self, start: int, end: int) -> None:
        if self.fresh or end <= start:
            return
        for a, b in self._ahead.gaps(start, end):
            self._zero(a, b)

    def _zero(self, start: int, end: int) -> None:
        if isinstance(self.image, ZeroingBackend):
            self.image.write_zeroes(start, end - start)
            return
        for off, chunk in zero_chunks(start, end - start):
            self.image.pwrite(off, chunk)


#: bytes per digest chunk (:mod:`xmig.digest`): a 4 KiB guest write re-reads 64 KiB
DIGEST_CHUNK = 64 << 10


def image_digests(size: int, *, known_zero: bool = False) -> ChunkDigests:
    """Chunk digests of an image's first ``size`` bytes (all stale unless ``known_zero``)."""
    return ChunkDigests(size, DIGEST_CHUNK, known_zero=known_zero)


def image_digest(backend: BlockBackend, size: int | None = None) -> str:
    """The digest of the first ``size`` bytes (default: all) of ``backend``, read now; the
    same value :class:`~xmig.digest.ChunkDigests` keeps incrementally."""
    end = backend.size if size is None else size
    return image_digests(end).full_digest(backend.pread).hex()
