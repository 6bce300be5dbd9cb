"""Memory targets: the page codec's decoder (what a destination does with a batch a peer
sends: decode, then apply to guest memory) and the QEMU RAM check's messages (RAM fixups
written into a RAM file, the source's digests, READY's chunk list)."""

from __future__ import annotations

import atexit
import functools
import os
import random
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash
import zstandard

from xmig.errors import ProtocolError
from xmig.guest.qemu import ramcheck
from xmig.memory.codec import (
    FLAG_ZSTD,
    HEADER,
    MAX_COUNT,
    TRAILER,
    VERSION,
    MsgType,
    PageBatch,
    PageDecoder,
    PageEncoder,
)
from xmig.memory.guest import PAGE_SIZE
from xmig.memory.testing import ArrayMemory

from .core import ChangedOnError, Target
from .mutate import bytes_mutation, extreme_int, join_messages, sequence_mutation, split_messages

PAGES = 64
_dec = PageDecoder(PAGES)
_mem = ArrayMemory(PAGES)
_ZSTD = zstandard.ZstdCompressor(level=1)


def page_seeds() -> list[bytes]:
    """Messages of every form (zero runs, full, delta, dup; compressed or not; END)."""
    return list(_page_seeds())


@functools.cache
def _page_seeds() -> tuple[bytes, ...]:
    rng = np.random.default_rng(7)
    src = ArrayMemory(PAGES)
    pattern = rng.integers(0, 256, (PAGES, 64), dtype=np.uint8)
    pages = np.tile(pattern, (1, PAGE_SIZE // 64))  # compressible: small seeds
    pages[::5] = 0
    pages[3] = pages[1]  # a dup
    src.pages[:] = pages
    enc = PageEncoder(PAGES)
    idx = np.arange(PAGES, dtype=np.int64)
    out = enc.encode(idx, src.read_pages(idx))
    src.pages[2:10] = 0  # zero runs where the destination holds data
    src.pages[11, :8] ^= 0xFF  # a delta
    src.pages[21] = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)  # noise: sent raw
    again = np.array([*range(2, 12), 21], dtype=np.int64)
    out += enc.encode(again[:-1], src.read_pages(again[:-1]))
    out += enc.encode(again[-1:], src.read_pages(again[-1:]))
    out.append(enc.end(rounds=2, digest=bytes(range(16))))
    out.append(enc.end(rounds=0))
    return tuple(out)


def _seal(head: bytes, body: bytes) -> bytes:
    return head + body + TRAILER.pack(xxhash.xxh3_64_intdigest(head + body))


def zstd_claiming(size: int, regenerated: int = 64) -> bytes:
    """A zstd frame whose header claims ``size`` bytes of content and holds one RLE block
    of ``regenerated`` zeros (a bomb's header: what the decoder allocates from)."""
    head = struct.pack("<IB", 0xFD2FB528, 0xE0) + struct.pack("<Q", size)
    block = (regenerated << 3) | (1 << 1) | 1  # RLE, last block
    return head + block.to_bytes(3, "little") + b"\x00"


def fix_pages(data: bytes) -> bytes:
    """Repair a PAGES message's body length and every message's trailing checksum."""
    if len(data) >= HEADER.size and data[1] == MsgType.PAGES:
        head = bytearray(data[:HEADER.size])
        struct.pack_into("<I", head, HEADER.size - 4, max(0, len(data) - HEADER.size
                                                          - TRAILER.size))
        data = bytes(head) + data[HEADER.size:]
    if len(data) < TRAILER.size:
        return data
    return data[:-TRAILER.size] + TRAILER.pack(xxhash.xxh3_64_intdigest(data[:-TRAILER.size]))


def _body(flags: int, payload: bytes) -> bytes:
    if not flags & FLAG_ZSTD:
        return payload
    try:
        if not 0 <= zstandard.frame_content_size(payload) <= 1 << 20:  # a bomb's header
            return payload
        return zstandard.ZstdDecompressor().decompress(payload, max_output_size=1 << 20)
    except zstandard.ZstdError:
        return payload


def mutate_pages(data: bytes, rng: random.Random) -> bytes:
    """Structure-aware: change a count, an index word, a run length, the flags or the
    compression of a PAGES message's body, or the END fields; then seal it again."""
    if len(data) < HEADER.size + TRAILER.size or data[1] != MsgType.PAGES or rng.random() < 0.2:
        return fix_pages(bytes_mutation(data, rng, page_seeds()))
    fields = list(HEADER.unpack_from(data))  # version, type, flags, runs, full, delta, dup, len
    body = bytearray(_body(fields[2], data[HEADER.size:-TRAILER.size]))
    op = rng.random()
    if op < 0.25:
        k = rng.randrange(3, 7)
        fields[k] = rng.choice((0, 1, (fields[k] + 1) & 0xFFFFFFFF, max(0, fields[k] - 1),
                                MAX_COUNT, MAX_COUNT + 1, PAGES, (1 << 32) - 1))
    elif op < 0.6 and len(body) >= 8:
        at = 8 * rng.randrange(len(body) // 8)
        width = rng.choice((8, 8, 4))
        val = rng.choice((0, PAGES - 1, PAGES, PAGES + 1, extreme_int(rng, width)))
        if rng.random() < 0.3:
            val = int.from_bytes(body[8 * rng.randrange(len(body) // 8):][:width], "little")
        body[at:at + width] = val.to_bytes(width, "little")
    elif op < 0.7:
        fields[2] = rng.choice((0, FLAG_ZSTD, 2, 0xFF))
    elif op < 0.8:
        body = bytearray(bytes_mutation(bytes(body), rng))
    elif op < 0.9:  # a bomb's header: the size the counts imply, or another
        n = fields[3] + fields[4] + fields[5] + 2 * fields[6]
        size = -(-(8 * n + 4 * fields[3]) // 8) * 8 + (fields[4] + fields[5]) * PAGE_SIZE
        fields[2] = FLAG_ZSTD
        return _bomb(fields, size, rng)
    if fields[2] & FLAG_ZSTD and op >= 0.7 and rng.random() < 0.8:
        payload = _ZSTD.compress(bytes(body))
    else:
        payload = bytes(body)
    fields[7] = len(payload)
    return _seal(HEADER.pack(*fields), payload)


def _bomb(fields: list[int], size: int, rng: random.Random) -> bytes:
    claim = rng.choice((size, size + 1, 1 << 30, 1 << 40, (1 << 64) - 2))
    payload = zstd_claiming(claim, rng.choice((0, 64, 4096)))
    fields[7] = len(payload)
    return _seal(HEADER.pack(*fields), payload)


def run_pages(data: bytes) -> str:
    """Decode a message as the destination does, and apply it to guest memory."""
    out = _dec.decode(data)
    if isinstance(out, PageBatch):
        _dec.apply(out, _mem)
    return type(out).__name__


def page_nasty() -> list[bytes]:
    out = []
    for counts in ((0, MAX_COUNT, 0, 0), (0, 0, MAX_COUNT, 0), (MAX_COUNT, 0, 0, MAX_COUNT),
                   (0, 1 << 20, 0, 0), (0, 100000, 0, 0), (0, PAGES + 1, 0, 0)):
        n = counts[0] + counts[1] + counts[2] + 2 * counts[3]
        size = -(-(8 * n + 4 * counts[0]) // 8) * 8 + (counts[1] + counts[2]) * PAGE_SIZE
        payload = zstd_claiming(size)
        head = HEADER.pack(VERSION, MsgType.PAGES, FLAG_ZSTD, *counts, len(payload))
        out.append(_seal(head, payload))
    big_runs = HEADER.pack(VERSION, MsgType.PAGES, 0, 1, 0, 0, 0, 16)
    out.append(_seal(big_runs, struct.pack("<QI", 0, (1 << 32) - 1) + bytes(4)))
    out.append(_seal(HEADER.pack(VERSION, MsgType.PAGES, 0, 0, 0, 0, 0, 0), b""))
    return out


# -- the RAM check -----------------------------------------------------------------------

_DIR = tempfile.mkdtemp(prefix="xmig-fuzz-")
atexit.register(shutil.rmtree, _DIR, True)
_RAM = os.path.join(_DIR, "ram")  # the destination's RAM file
_SRC = os.path.join(_DIR, "src")  # the source's, to make seeds from
RAM_BYTES = 8 * ramcheck.CHUNK
for _path in (_RAM, _SRC):
    with open(_path, "wb") as _f:
        _f.write(random.Random(_path).randbytes(RAM_BYTES))
_shadow = [Path(_RAM).read_bytes()]  # what the RAM file holds


def fixup_seeds() -> list[bytes]:
    out = ramcheck.encode_fixups(_SRC, np.array([1, 3, 7], np.int64))
    out += ramcheck.encode_fixups(_SRC, np.array([0, 2], np.int64), message_bytes=8192)
    out += ramcheck.encode_fixups(_SRC, np.zeros(0, np.int64))
    return out


@dataclass
class _Item:
    offset: int
    length: int
    data: bytes

    def encode(self) -> bytes:
        return struct.pack("<QI", self.offset, self.length) + self.data


def mutate_fixups(data: bytes, rng: random.Random) -> bytes:
    """A field of the head (chunk, count, more) or of an item (offset, length), its data
    cut or grown, or an item repeated; lengths kept consistent unless they are the field."""
    if len(data) < 12 or rng.random() < 0.2:
        return bytes_mutation(data, rng)
    chunk, count, more = struct.unpack_from("<III", data)
    items: list[_Item] = []
    pos = 12
    while pos + 12 <= len(data):
        off, n = struct.unpack_from("<QI", data, pos)
        items.append(_Item(off, n, data[pos + 12:pos + 12 + n]))
        pos += 12 + n
    op = rng.random()
    if op < 0.3 or not items:
        count, more = rng.choice(((extreme_int(rng, 4, count), more), (count, 2)))
    else:
        it = rng.choice(items)
        if op < 0.5:
            it.data = it.data[:rng.randrange(len(it.data) + 1)] + rng.randbytes(
                rng.choice((0, 0, 1, 8192)))
            it.length = len(it.data)
        elif op < 0.7:
            it.offset = extreme_int(rng, 8, it.offset, RAM_BYTES)
        elif op < 0.9:
            it.length = extreme_int(rng, 4, it.length, RAM_BYTES)
        else:
            items += [it] * rng.choice((1, 100))
            count = len(items)
    return struct.pack("<III", chunk, count, more) + b"".join(i.encode() for i in items)


def run_fixups(data: bytes) -> str:
    """Apply a fixup message to the RAM file; a typed error must leave it unchanged."""
    try:
        count, more = ramcheck.apply_fixups(_RAM, data)
    except ProtocolError as err:
        with open(_RAM, "rb") as f:
            now = f.read()
        if now != _shadow[0]:
            _shadow[0] = now
            raise ChangedOnError(f"{err} after writing the RAM file") from err
        raise
    if count:
        with open(_RAM, "rb") as f:
            _shadow[0] = f.read()
    return f"fixups-{'more' if more else 'last'}"


def digest_seeds() -> list[bytes]:
    digests = np.arange(1, 40, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return [join_messages(ramcheck.encode_digest_messages(digests, message_bytes=96)),
            join_messages(ramcheck.encode_digest_messages(digests[:0])),
            join_messages(ramcheck.encode_digest_messages(digests))]


def run_digests(data: bytes) -> str:
    """The destination collects the source's RAM digests messages until the last one."""
    asm = ramcheck.DigestAssembler()
    for msg in split_messages(data):
        if asm.add(msg):
            break
    return f"digests-{len(asm.digests())}" if asm.done else "incomplete"


def _mutate_digest_msg(m: bytes, rng: random.Random) -> bytes:
    if len(m) < 20 or rng.random() < 0.3:
        return bytes_mutation(m, rng)
    start, total, more = struct.unpack_from("<QQI", m)
    k = rng.randrange(3)
    vals = [start, total, more]
    vals[k] = extreme_int(rng, 4 if k == 2 else 8, vals[k])
    return struct.pack("<QQI", *vals) + m[20:]


def chunk_seeds() -> list[bytes]:
    chunks = np.array([0, 3, 7], np.int64)
    digests = np.arange(8, dtype=np.uint64)
    return [b"c" + ramcheck.encode_chunks(chunks).encode(), b"c",
            b"d" + ramcheck.encode_digests(digests).encode()]


def run_chunks(data: bytes) -> str:
    """READY's chunk list (``c``) or a digests string (``d``), as text from JSON."""
    text = data[1:].decode("utf-8", "surrogateescape")
    if data[:1] == b"d":
        return f"digests-{len(ramcheck.decode_digests(text)) > 0}"
    return f"chunks-{len(ramcheck.decode_chunks(text, 8)) > 0}"


def _mutate_chunks(data: bytes, rng: random.Random) -> bytes:
    import base64

    try:
        raw = base64.b64decode(data[1:], validate=True)
    except ValueError:
        return bytes_mutation(data, rng)
    if rng.random() < 0.3:
        return data[:1] + bytes_mutation(data[1:], rng)
    return data[:1] + base64.b64encode(bytes_mutation(raw, rng))


def _ram_nasty() -> list[bytes]:
    item = struct.pack("<QI", 0, 16) + b"x" * 16
    return [struct.pack("<III", 8192, (1 << 32) - 1, 0),
            struct.pack("<III", 8192, 2, 0) + item + struct.pack("<QI", RAM_BYTES, 1) + b"y",
            struct.pack("<III", 8192, 2, 0) + item + struct.pack("<QI", 0, 99),
            struct.pack("<III", 8192, 1, 0) + struct.pack("<QI", (1 << 64) - 1, 2) + b"zz"]


def _digest_nasty() -> list[bytes]:
    head = struct.pack("<QQI", 0, (1 << 64) - 1, 1)
    return [join_messages([head + bytes(8)] * 2), join_messages([struct.pack("<QQI", 0, 1, 0)]),
            join_messages([head] * 1000)]


TARGETS = [
    Target("page_codec", run_pages, page_seeds, mutate_pages, fix_pages, page_nasty,
           max_len=1 << 20),
    Target("ramcheck_fixups", run_fixups, fixup_seeds, mutate_fixups, None, _ram_nasty),
    Target("ramcheck_digests", run_digests, digest_seeds,
           lambda d, r: sequence_mutation(d, r, lambda m: _mutate_digest_msg(m, r)), None,
           _digest_nasty),
    Target("ramcheck_chunks", run_chunks, chunk_seeds, _mutate_chunks, None,
           lambda: [b"c" + b"A" * 100000, b"d\xff\xfe", b"c====", b"d" + b"QUFB" * 3 + b"QQ=="]),
]
