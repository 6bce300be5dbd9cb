"""The guest's key-value table, kept in guest RAM so that it migrates with the memory.

Open addressing with linear probing over fixed slots of :data:`SLOT_BYTES` in the last
``table_bytes`` of RAM (slots never straddle a page). A slot::

    0   u64  tag        xxh3-64 of the key, low bit forced to 1 (0 = empty slot)
    8   u16  key length   (≤ MAX_KEY)
    10  u16  value length (≤ MAX_VALUE)
    12  u32  version      puts to this key, mod 2**32
    16  key bytes, then value bytes at 64

No deletes. Every put marks the slot's page dirty after writing it (the dirty-log rule).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import xxhash

from xmig.memory.guest import PAGE_SIZE

SLOT_BYTES = 256
MAX_KEY = 48
MAX_VALUE = SLOT_BYTES - 64
_HEADER = struct.Struct("<QHHI")
_KEY_AT = 16
_VALUE_AT = 64


class TableFull(Exception):
    """No free slot for a new key."""


class KvTable:
    """Puts and gets on the table region ``memory[first_page*PAGE_SIZE : +pages*PAGE_SIZE]``.

    ``mark_page`` is called with the RAM page index of every slot written, after the write.
    """

    def __init__(
        self,
        memory: memoryview,
        *,
        first_page: int,
        pages: int,
        mark_page: Callable[[int], None],
        entries: int = 0,
    ) -> None:
        self._base = first_page * PAGE_SIZE
        self._region = memory[self._base : self._base + pages * PAGE_SIZE]
        self.first_page = first_page
        self.pages = pages
        self.slots = pages * PAGE_SIZE // SLOT_BYTES
        self._mark_page = mark_page
        self.entries = entries

    def _find(self, key: bytes) -> tuple[int, int, bool]:
        """(slot, tag, present) for ``key``: its slot, or the empty slot it would take."""
        tag = xxhash.xxh3_64_intdigest(key) | 1
        slot = (tag >> 1) % self.slots
        for _ in range(self.slots):
            at = slot * SLOT_BYTES
            found, klen, _vlen, _version = _HEADER.unpack_from(self._region, at)
            if found == 0:
                return slot, tag, False
            if found == tag and bytes(self._region[at + _KEY_AT : at + _KEY_AT + klen]) == key:
                return slot, tag, True
            slot = (slot + 1) % self.slots
        return -1, tag, False

    def put(self, key: bytes, value: bytes) -> None:
        """Store ``value`` under ``key``. ValueError if too long, :class:`TableFull`."""
        if not 0 < len(key) <= MAX_KEY or len(value) > MAX_VALUE:
            raise ValueError(f"key of {len(key)} or value of {len(value)} bytes out of bounds")
        slot, tag, present = self._find(key)
        if slot < 0:
            raise TableFull(f"all {self.slots} slots taken")
        at = slot * SLOT_BYTES
        version = _HEADER.unpack_from(self._region, at)[3] + 1 if present else 1
        self._region[at + _VALUE_AT : at + _VALUE_AT + len(value)] = value
        if not present:
            self._region[at + _KEY_AT : at + _KEY_AT + len(key)] = key
            self.entries += 1
        _HEADER.pack_into(self._region, at, tag, len(key), len(value), version & 0xFFFFFFFF)
        self._mark_page(self.first_page + at // PAGE_SIZE)

    def get(self, key: bytes) -> bytes | None:
        """The value stored under ``key``, or None."""
        if not 0 < len(key) <= MAX_KEY:
            return None
        slot, _tag, present = self._find(key)
        if not present:
            return None
        at = slot * SLOT_BYTES
        vlen = _HEADER.unpack_from(self._region, at)[2]
        return bytes(self._region[at + _VALUE_AT : at + _VALUE_AT + vlen])

    def release(self) -> None:
        """Drop the view of guest memory (so the mapping can be closed)."""
        self._region.release()
