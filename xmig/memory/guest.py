"""What the memory engine needs from a guest: the interfaces hypervisor backends implement.

The page engine (:mod:`xmig.memory`) reads a running guest's memory together with its dirty
log on the source, and writes pages into the paused destination guest's memory. Backends
(``xmig.guest.sim`` today, QEMU with shared RAM later) implement these protocols; the
memory package never imports a backend.

The dirty-log rule that makes pre-copy lose no write (DESIGN.md): the guest marks a page
dirty *after* writing it; :meth:`SourceMemory.fetch_and_clear_dirty` clears a mark *before*
the engine reads the page. Any write then lands either in the copy being sent or in the
next round's log.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

PAGE_SIZE = 4096

PageIndices = npt.NDArray[np.int64]


class SourceMemory(Protocol):
    """A running guest's memory, read on the source host."""

    @property
    def page_count(self) -> int:
        """Pages of guest RAM (RAM bytes ÷ :data:`PAGE_SIZE`)."""
        ...

    def fetch_and_clear_dirty(self) -> PageIndices:
        """Indices (ascending) of the pages written since the last call, their marks cleared
        before this returns. The first call after the guest starts returns every page."""
        ...

    def mark_all_dirty(self) -> None:
        """Mark every page dirty: the next fetch returns every page. A migration starts so,
        whatever an earlier, aborted one already fetched (its destination is gone)."""
        ...

    def read_pages(self, indices: PageIndices) -> memoryview:
        """The current contents of ``indices``, concatenated (``len(indices) * PAGE_SIZE``).
        Contents may be newer than the dirty log says; never older."""
        ...

    def dirty_rate(self) -> float:
        """Bytes per second the guest has been dirtying lately (distinct pages × PAGE_SIZE)."""
        ...

    def set_throttle(self, fraction: float) -> None:
        """Stall the vCPU ``fraction`` of the time (0.0 = full speed, 0.99 at most): the
        SDPS actuator."""
        ...


class DestinationMemory(Protocol):
    """A paused destination guest's memory, written on the destination host."""

    @property
    def page_count(self) -> int: ...

    def write_pages(self, indices: PageIndices, data: memoryview | bytes) -> None:
        """Store ``data`` (``len(indices) * PAGE_SIZE`` bytes) at ``indices``."""
        ...

    def read_pages(self, indices: PageIndices) -> memoryview:
        """What is stored at ``indices`` (for XOR-delta decoding and digests)."""
        ...

    def zero_pages(self, indices: PageIndices) -> None:
        """Make ``indices`` all zeros."""
        ...
