"""The page codec: batches of guest pages to MEMORY-channel messages and back. Sans-IO.

:class:`PageEncoder` (source) turns ``(indices, contents)`` into messages of at most
``max_message`` bytes; :class:`PageDecoder` (destination) checks a message whole and only
then applies it to a :class:`~xmig.memory.guest.DestinationMemory`. Per page the encoder
picks the cheapest form the destination can rebuild exactly:

- *zero*: all-zero pages travel as index runs, and not at all when the destination already
  holds zeros there (the destination starts zero-filled: a fresh, paused guest);
- *dup*: a page whose content (xxh3-128) the destination already holds at another index
  refers to that index; the encoder tracks what the destination holds at every index, so
  the reference is valid exactly when it is applied;
- *delta*: a page sent before whose last-sent version is still in the bounded LRU cache goes
  as its XOR against that version, when at most ``delta_max_words`` of its 512 words
  changed;
- *full*: the content.

Full pages and deltas (and the index lists) are compressed together with zstd.

Message format (little-endian), version 1::

    PAGES: u8 version | u8 type=1 | u8 flags | u8 0 | u32 runs | u32 full | u32 delta
           | u32 dup | u32 body length | body | u64 xxh3-64 of everything before
      body (zstd-compressed when flags & 1): u64 run starts[runs] | u64 full[full]
           | u64 delta[delta] | u64 dup targets[dup] | u64 dup sources[dup]
           | u32 run lengths[runs] | zero padding to 8 | 4 KiB pages[full] | 4 KiB XORs[delta]
    END:   u8 version | u8 type=2 | u8 flags (1: digest present) | u8 0 | u32 rounds
           | u64 pages | 16-byte digest | u64 xxh3-64 of everything before

A PAGES message is applied in the order zero runs, full pages, deltas, dups (a dup copies
the destination's content after the first three; a dup source is never a dup target of
the same message). Every malformed message raises :class:`~xmig.errors.ProtocolError`
before anything is written.
"""

from __future__ import annotations

import bisect
import enum
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import xxhash
import zstandard

from xmig.errors import ProtocolError
from xmig.memory.guest import PAGE_SIZE, DestinationMemory, PageIndices

VERSION = 1
WORDS = PAGE_SIZE // 8
HEADER = struct.Struct("<BBBxIIIII")
END = struct.Struct("<BBBxIQ16s")
TRAILER = struct.Struct("<Q")
FLAG_ZSTD = 1
FLAG_DIGEST = 1
MAX_COUNT = 1 << 22  #: entries of one kind in one message, at most (bounds allocation)
#: a PAGES body's size (decompressed) at most: the decoder refuses a larger one before it
#: allocates anything. An encoder's body never exceeds its ``max_message`` (every entry
#: costs the budget at least what it takes in the body), 1 MiB by default, and a message
#: never exceeds the transport's maximum payload (4 MiB by default).
MAX_BODY = 16 << 20
_MASK64 = (1 << 64) - 1
ZERO_DIGEST = xxhash.xxh3_128_intdigest(bytes(PAGE_SIZE))


class MsgType(enum.IntEnum):
    PAGES = 1
    END = 2


@dataclass(frozen=True)
class CodecConfig:
    """Tunables of the encoder (the decoder needs none)."""

    level: int = 1  #: zstd level (measured: bench/memory_codec.py)
    cache_bytes: int = 64 << 20  #: last-sent versions kept for XOR deltas (LRU)
    max_message: int = 1 << 20  #: bytes per message, at most
    dedup: bool = True  #: identical pages sent once
    delta_max_words: int = 256  #: a re-sent page goes as a delta if ≤ this many words changed
    dedup_entries: int = 1 << 21  #: distinct digests remembered for dedup, at most

    def __post_init__(self) -> None:
        if self.max_message < HEADER.size + TRAILER.size + 2 * (PAGE_SIZE + 64):
            raise ValueError(f"max_message {self.max_message} cannot hold two pages")
        if not 0 <= self.delta_max_words <= WORDS:
            raise ValueError(f"delta_max_words must be within 0..{WORDS}")
        if self.max_message > MAX_BODY:
            raise ValueError(f"max_message {self.max_message} > {MAX_BODY}, the most a "
                             "decoder accepts")


@dataclass
class CodecStats:
    """What the encoder did; ``wire_ratio`` = wire bytes ÷ raw bytes (pages × 4 KiB)."""

    pages: int = 0
    zero_pages: int = 0  #: sent as runs, or skipped (the destination already had zeros)
    full_pages: int = 0
    delta_pages: int = 0
    dup_pages: int = 0
    messages: int = 0
    raw_bytes: int = 0
    wire_bytes: int = 0
    delta_raw_bytes: int = 0  #: uncompressed XOR bytes (pages sent as deltas × 4 KiB)

    @property
    def wire_ratio(self) -> float:
        return self.wire_bytes / self.raw_bytes if self.raw_bytes else 1.0

    def copy(self) -> CodecStats:
        return CodecStats(**vars(self))


@dataclass(frozen=True)
class PageBatch:
    """A decoded, checked PAGES message."""

    run_starts: npt.NDArray[np.int64]
    run_lengths: npt.NDArray[np.int64]
    full: PageIndices
    delta: PageIndices
    dup_targets: PageIndices
    dup_sources: PageIndices
    content: memoryview  #: full pages, then XOR deltas, 4 KiB each

    def touched(self) -> PageIndices:
        """Every page this batch writes."""
        return np.concatenate([self.zero_indices(), self.full, self.delta, self.dup_targets])

    @property
    def pages(self) -> int:
        return int(self.run_lengths.sum()) + len(self.full) + len(self.delta) + len(
            self.dup_targets
        )

    def zero_indices(self) -> PageIndices:
        if not len(self.run_starts):
            return np.empty(0, np.int64)
        return np.concatenate(
            [np.arange(s, s + n, dtype=np.int64) for s, n in zip(
                self.run_starts.tolist(), self.run_lengths.tolist(), strict=True)]
        )


@dataclass(frozen=True)
class EndOfMemory:
    """The end-of-memory marker: no page follows."""

    rounds: int
    pages: int  #: pages the source sent in all (every form)
    digest: bytes | None = None  #: the source's memory digest at pause, when it sent one


def _runs(idx: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Ascending indices → (starts, lengths) of consecutive runs."""
    if not len(idx):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = idx[np.concatenate(([0], breaks))]
    ends = np.concatenate((breaks, [len(idx)]))
    lengths = ends - np.concatenate(([0], breaks))
    return starts, lengths.astype(np.int64)


def _seal(head: bytes, payload: bytes | memoryview) -> bytes:
    h = xxhash.xxh3_64(head)
    h.update(payload)
    return b"".join((head, payload, TRAILER.pack(h.intdigest())))


@dataclass
class _Msg:
    """The message being assembled by :meth:`PageEncoder.encode`."""

    start: int  #: first position (in the chunk) it covers
    content_pos: list[int] = field(default_factory=list)
    dup_pos: list[int] = field(default_factory=list)
    dup_src: list[int] = field(default_factory=list)
    dup_of: dict[int, int] = field(default_factory=dict)  #: dup target → its source
    cost: int = 0


class _Cache:
    """Last-sent page versions in a numpy slab, LRU by page index."""

    def __init__(self, nbytes: int) -> None:
        self.slots = max(0, nbytes // PAGE_SIZE)
        self.slab = np.empty((self.slots, PAGE_SIZE), np.uint8)
        self.where: OrderedDict[int, int] = OrderedDict()
        self.free = list(range(self.slots - 1, -1, -1))

    def lookup(self, pages: list[int]) -> tuple[list[int], list[int]]:
        """(positions in ``pages`` that are cached, their slots)."""
        pos, slots = [], []
        where = self.where
        for k, p in enumerate(pages):
            s = where.get(p)
            if s is not None:
                pos.append(k)
                slots.append(s)
        return pos, slots

    def store(self, pages: list[int], rows: npt.NDArray[np.uint8]) -> None:
        """``rows`` are now the destination's versions of ``pages``."""
        if len(pages) > self.slots:  # keep the newest; the others must not stay stale
            self.drop(pages[:len(pages) - self.slots])
            pages, rows = pages[len(pages) - self.slots:], rows[len(rows) - self.slots:]
        if not pages:
            return
        where, free = self.where, self.free
        slots = []
        for p in pages:
            s = where.get(p)
            if s is not None:
                where.move_to_end(p)
            else:
                s = free.pop() if free else where.popitem(last=False)[1]
                where[p] = s
            slots.append(s)
        self.slab[np.asarray(slots, np.int64)] = rows

    def drop(self, pages: list[int]) -> None:
        """Forget ``pages`` (the destination no longer holds the cached versions)."""
        if self.where:
            for p in pages:
                s = self.where.pop(p, None)
                if s is not None:
                    self.free.append(s)


class PageEncoder:
    """Source side. Keeps, per page, what the destination holds (digest, zero, cached
    version), so every message it produces is exact when applied in order."""

    def __init__(self, page_count: int, config: CodecConfig | None = None) -> None:
        self.page_count = page_count
        self.config = config or CodecConfig()
        self.stats = CodecStats()
        self._cctx = zstandard.ZstdCompressor(level=self.config.level)
        self._held = np.zeros(page_count, np.uint64)  #: low 64 bits of the held digest
        self._held[:] = ZERO_DIGEST & _MASK64
        self._zero = np.ones(page_count, bool)  #: the destination holds zeros there
        self._holder: dict[int, int] = {}  #: digest → an index that held it when sent
        self._cache = _Cache(self.config.cache_bytes)
        self._budget = self.config.max_message - HEADER.size - TRAILER.size - 64

    def encode(self, indices: PageIndices, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Messages for pages ``indices`` (strictly ascending) whose contents are ``data``
        (copied first unless it is ``bytes``)."""
        idx = np.asarray(indices, dtype=np.int64)
        n = len(idx)
        if len(data) != n * PAGE_SIZE:
            raise ValueError(f"{len(data)} bytes of data for {n} pages")
        if n == 0:
            return []
        if np.any(np.diff(idx) <= 0) or idx[0] < 0 or idx[-1] >= self.page_count:
            raise ValueError("page indices must be strictly ascending and within the guest")
        # a snapshot: the guest may write while we encode, and what is hashed, compared and
        # cached must be exactly what is sent
        flat = np.frombuffer(data, np.uint8)
        if not isinstance(data, bytes):
            flat = flat.copy()
        pages = flat.reshape(n, PAGE_SIZE)
        mv = flat.data
        nonzero = pages.view(np.uint64).any(axis=1)
        zero_idx = idx[~nonzero]
        send_zero = np.zeros(n, bool)
        send_zero[~nonzero] = ~self._zero[zero_idx]
        # destination state for zero pages changes here: later dups never refer to them,
        # earlier ones in this chunk cannot (see the rule below)
        self._zero[zero_idx] = True
        self._held[zero_idx] = ZERO_DIGEST & _MASK64
        self._cache.drop(zero_idx.tolist())
        self.stats.pages += n
        self.stats.zero_pages += len(zero_idx)
        self.stats.raw_bytes += n * PAGE_SIZE

        out: list[bytes] = []
        idx_list = idx.tolist()
        chunk = set(idx_list)
        held, zero, holder = self._held, self._zero, self._holder
        dedup, max_holders = self.config.dedup, self.config.dedup_entries
        # zc[p]: zero pages to send before position p (each may cost a 12-byte run)
        zc = np.concatenate(([0], np.cumsum(send_zero))).tolist()
        budget = self._budget
        msg = _Msg(0)
        d = d64 = 0
        for p in np.flatnonzero(nonzero).tolist():
            i = idx_list[p]
            src = -1
            if dedup:
                d = xxhash.xxh3_128_intdigest(mv[p * PAGE_SIZE:(p + 1) * PAGE_SIZE])
                d64 = d & _MASK64
                j = holder.get(d)
                # j must hold d now, and must not be rewritten later in this chunk
                if (j is not None and j != i and held[j] == d64 and not zero[j]
                        and not (j > i and j in chunk)):
                    src = msg.dup_of.get(j, j)
            cost = 24 if src >= 0 else PAGE_SIZE + 8 + 12
            if msg.cost + cost + 12 * (zc[p] - zc[msg.start]) > budget:
                msg = self._cut(out, msg, p, budget - cost, zc, idx, pages, send_zero)
            msg.cost += cost
            if src >= 0:
                msg.dup_pos.append(p)
                msg.dup_src.append(src)
                msg.dup_of[i] = src
            else:
                msg.content_pos.append(p)
                if dedup and (len(holder) < max_holders or d in holder):
                    holder[d] = i
            if dedup:
                held[i] = d64
            zero[i] = False
        msg = self._cut(out, msg, n, budget, zc, idx, pages, send_zero)
        out.append(self._finish(msg, n, idx, pages, send_zero))
        return [m for m in out if m]

    def _cut(self, out: list[bytes], msg: _Msg, p: int, room: int, zc: list[int],
             idx: npt.NDArray[np.int64], pages: npt.NDArray[np.uint8],
             send_zero: npt.NDArray[np.bool_]) -> _Msg:
        """Seal messages until the one open at position ``p`` has ``room`` bytes left.
        Each sealed message ends where its zero runs still fit the budget."""
        while msg.cost + 12 * (zc[p] - zc[msg.start]) > room:
            limit = zc[msg.start] + (self._budget - msg.cost) // 12
            q = min(p, bisect.bisect_right(zc, limit) - 1)
            out.append(self._finish(msg, q, idx, pages, send_zero))
            msg = _Msg(q)
        return msg

    def _finish(self, msg: _Msg, end: int, idx: npt.NDArray[np.int64],
                pages: npt.NDArray[np.uint8], send_zero: npt.NDArray[np.bool_]) -> bytes:
        """Seal the message covering chunk positions ``msg.start``..``end``."""
        zpos = msg.start + np.flatnonzero(send_zero[msg.start:end])
        starts, lengths = _runs(idx[zpos])
        cpos = np.asarray(msg.content_pos, np.int64)
        cidx = idx[cpos]
        rows = pages[cpos]
        # deltas: pages whose last-sent version is cached and changed in few words
        cached_k, slots = self._cache.lookup(cidx.tolist())
        is_delta = np.zeros(len(cpos), bool)
        xors = np.empty((0, PAGE_SIZE), np.uint8)
        if cached_k:
            k = np.asarray(cached_k, np.int64)
            x = rows[k].view(np.uint64) ^ self._cache.slab[np.asarray(slots)].view(np.uint64)
            few = np.count_nonzero(x, axis=1) <= self.config.delta_max_words
            is_delta[k[few]] = True
            xors = x[few].view(np.uint8)
        full_rows = rows[~is_delta]
        dpos = np.asarray(msg.dup_pos, np.int64)
        # the destination holds these versions after this message
        self._cache.store(cidx.tolist(), rows)
        if len(dpos):
            self._cache.store(idx[dpos].tolist(), pages[dpos])
        n_runs, n_full, n_delta, n_dup = len(starts), len(full_rows), len(xors), len(dpos)
        if not (n_runs or n_full or n_delta or n_dup):
            return b""
        index_words = np.concatenate((
            starts, cidx[~is_delta], cidx[is_delta], idx[dpos],
            np.asarray(msg.dup_src, np.int64)
        )).astype("<u8")
        head_len = index_words.nbytes + 4 * n_runs
        head_len += -head_len % 8
        body = np.zeros(head_len + (n_full + n_delta) * PAGE_SIZE, np.uint8)
        body[:index_words.nbytes] = index_words.view(np.uint8)
        body[index_words.nbytes:index_words.nbytes + 4 * n_runs] = (
            lengths.astype("<u4").view(np.uint8))
        at = head_len
        for block in (full_rows, xors):
            body[at:at + block.size] = block.reshape(-1)
            at += block.size
        packed = self._cctx.compress(body.data)
        flags = FLAG_ZSTD
        payload: bytes | memoryview = packed
        if len(packed) >= body.nbytes:
            flags, payload = 0, body.data
        head = HEADER.pack(VERSION, MsgType.PAGES, flags, n_runs, n_full, n_delta, n_dup,
                           len(payload))
        out = _seal(head, payload)
        st = self.stats
        st.full_pages += n_full
        st.delta_pages += n_delta
        st.delta_raw_bytes += n_delta * PAGE_SIZE
        st.dup_pages += n_dup
        st.messages += 1
        st.wire_bytes += len(out)
        return out

    def end(self, *, rounds: int, digest: bytes | None = None) -> bytes:
        """The end-of-memory marker (with the source's memory digest, if given)."""
        if digest is not None and len(digest) != 16:
            raise ValueError("digest must be 16 bytes (xxh3-128)")
        head = END.pack(VERSION, MsgType.END, FLAG_DIGEST if digest else 0, rounds,
                        self.stats.pages, digest or bytes(16))
        out = _seal(head, b"")
        self.stats.messages += 1
        self.stats.wire_bytes += len(out)
        return out


@dataclass
class DecoderStats:
    messages: int = 0
    pages: int = 0
    wire_bytes: int = 0


class PageDecoder:
    """Destination side: :meth:`decode` checks a message whole; :meth:`apply` writes it."""

    def __init__(self, page_count: int) -> None:
        self.page_count = page_count
        self.stats = DecoderStats()
        self._dctx = zstandard.ZstdDecompressor()

    def decode(self, message: bytes | bytearray | memoryview) -> PageBatch | EndOfMemory:
        """Parse and check ``message``; raises :class:`ProtocolError` if anything is off."""
        mv = memoryview(message).cast("B")
        if len(mv) < 2 + TRAILER.size:
            raise ProtocolError(f"memory message of {len(mv)} bytes is truncated")
        if mv[0] != VERSION:
            raise ProtocolError(f"memory message version {mv[0]}, this build speaks {VERSION}")
        (want,) = TRAILER.unpack_from(mv, len(mv) - TRAILER.size)
        if xxhash.xxh3_64_intdigest(mv[:-TRAILER.size]) != want:
            raise ProtocolError("memory message checksum mismatch (corrupt or truncated)")
        kind = mv[1]
        if kind == MsgType.END:
            if len(mv) != END.size + TRAILER.size:
                raise ProtocolError(f"END message of {len(mv)} bytes")
            _, _, flags, rounds, pages, digest = END.unpack_from(mv)
            if flags & ~FLAG_DIGEST:
                raise ProtocolError(f"END message with unknown flags {flags:#x}")
            return EndOfMemory(rounds, pages, digest if flags & FLAG_DIGEST else None)
        if kind != MsgType.PAGES:
            raise ProtocolError(f"unknown memory message type {kind}")
        if len(mv) < HEADER.size + TRAILER.size:
            raise ProtocolError("PAGES message shorter than its header")
        _, _, flags, n_runs, n_full, n_delta, n_dup, blen = HEADER.unpack_from(mv)
        if flags & ~FLAG_ZSTD:
            raise ProtocolError(f"PAGES message with unknown flags {flags:#x}")
        if blen != len(mv) - HEADER.size - TRAILER.size:
            raise ProtocolError(f"PAGES body length {blen} does not match the message")
        if max(n_runs, n_full, n_delta, n_dup) > MAX_COUNT:
            raise ProtocolError("PAGES message with too many entries")
        if n_runs + n_full + n_delta + n_dup > self.page_count:  # each page named once
            raise ProtocolError(f"PAGES message with more entries than the guest's "
                                f"{self.page_count} pages")
        nwords = n_runs + n_full + n_delta + 2 * n_dup
        head_len = 8 * nwords + 4 * n_runs
        head_len += -head_len % 8
        size = head_len + (n_full + n_delta) * PAGE_SIZE
        if size > MAX_BODY:  # refused before decompressing into it
            raise ProtocolError(f"PAGES body of {size} bytes > {MAX_BODY}")
        payload = mv[HEADER.size:len(mv) - TRAILER.size]
        if flags & FLAG_ZSTD:
            try:
                if zstandard.frame_content_size(payload) != size:
                    raise ProtocolError("PAGES body decompresses to the wrong size")
                body = memoryview(self._dctx.decompress(payload, max_output_size=size))
            except zstandard.ZstdError as err:
                raise ProtocolError(f"PAGES body does not decompress: {err}") from err
        else:
            body = payload
        if len(body) != size:
            raise ProtocolError(f"PAGES body of {len(body)} bytes, expected {size}")
        words = np.frombuffer(body, "<u8", nwords).astype(np.int64)
        if np.any(words < 0) or np.any(words >= self.page_count):
            raise ProtocolError("PAGES message names a page beyond the guest")
        starts, full, delta, dups, srcs = np.split(
            words, np.cumsum([n_runs, n_full, n_delta, n_dup]))
        lengths = np.frombuffer(body, "<u4", n_runs, 8 * nwords).astype(np.int64)
        self._check(starts, lengths, np.concatenate((full, delta, dups)), dups, srcs)
        return PageBatch(starts, lengths, full, delta, dups, srcs, body[head_len:])

    def _check(self, starts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64],
               targets: npt.NDArray[np.int64], dups: npt.NDArray[np.int64],
               srcs: npt.NDArray[np.int64]) -> None:
        """Every page is named once; runs ascend, do not overlap, stay in the guest; no dup
        source is a dup target."""
        if len(starts):
            ends = starts + lengths
            if np.any(lengths < 1) or ends[-1] > self.page_count or np.any(
                    starts[1:] < ends[:-1]):
                raise ProtocolError("PAGES message with bad zero runs")
            if len(targets):
                k = np.searchsorted(starts, targets, side="right") - 1
                if np.any((k >= 0) & (targets < ends[np.maximum(k, 0)])):
                    raise ProtocolError("PAGES message names a zero page again")
        if len(np.unique(targets)) != len(targets):
            raise ProtocolError("PAGES message names a page twice")
        if len(dups) and np.isin(srcs, dups).any():
            raise ProtocolError("PAGES message has a dup whose source is a dup target")

    def apply(self, batch: PageBatch, memory: DestinationMemory) -> None:
        """Write a decoded batch: zero runs, full pages, deltas, then dups."""
        if len(batch.run_starts):
            memory.zero_pages(batch.zero_indices())
        n_full, n_delta = len(batch.full), len(batch.delta)
        if n_full:
            memory.write_pages(batch.full, batch.content[:n_full * PAGE_SIZE])
        if n_delta:
            old = np.frombuffer(memory.read_pages(batch.delta), np.uint64)
            x = np.frombuffer(batch.content[n_full * PAGE_SIZE:], np.uint64)
            memory.write_pages(batch.delta, (old ^ x).data.cast("B"))
        if len(batch.dup_targets):
            memory.write_pages(batch.dup_targets, bytes(memory.read_pages(batch.dup_sources)))

    def feed(self, message: bytes | bytearray | memoryview, memory: DestinationMemory, *,
             on_applied: Callable[[PageIndices], None] | None = None) -> EndOfMemory | None:
        """Decode and apply ``message``; return the end marker when it is one.
        ``on_applied`` is told the pages written, after they are written."""
        out = self.decode(message)
        self.stats.messages += 1
        self.stats.wire_bytes += len(message)
        if isinstance(out, EndOfMemory):
            return out
        self.apply(out, memory)
        if on_applied is not None:
            on_applied(out.touched())
        self.stats.pages += out.pages
        return None
