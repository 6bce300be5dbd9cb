"""The page codec: exact round trips, every form of page, and refusal of bad messages."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from xmig.errors import ProtocolError
from xmig.memory.codec import (
    HEADER,
    TRAILER,
    CodecConfig,
    EndOfMemory,
    MsgType,
    PageBatch,
    PageDecoder,
    PageEncoder,
)
from xmig.memory.guest import PAGE_SIZE
from xmig.memory.testing import ArrayMemory, pattern_pages, text_pages

MIN_MESSAGE = HEADER.size + TRAILER.size + 2 * (PAGE_SIZE + 64)


def send(enc: PageEncoder, dec: PageDecoder, src: ArrayMemory, dst: ArrayMemory,
         idx: np.ndarray, limit: int) -> list[bytes]:
    msgs = enc.encode(idx, src.read_pages(idx))
    for m in msgs:
        assert len(m) <= limit
        assert dec.feed(m, dst) is None
    return msgs


def test_mixed_guest_round_trip_and_counters() -> None:
    src, dst = ArrayMemory(2048), ArrayMemory(2048)
    src.fill(seed=1)
    enc, dec = PageEncoder(2048), PageDecoder(2048)
    idx = src.fetch_and_clear_dirty()
    send(enc, dec, src, dst, idx, 1 << 20)
    assert np.array_equal(src.pages, dst.pages)
    s = enc.stats
    assert s.pages == 2048 and s.raw_bytes == 2048 * PAGE_SIZE
    assert s.zero_pages > 400 and s.dup_pages > 100  # 30 % zero, 10 % of 8 patterns
    assert s.zero_pages + s.full_pages + s.dup_pages == 2048 and s.delta_pages == 0
    assert 0.2 < s.wire_ratio < 0.5
    # a round of small edits goes as deltas that compress far below the pages
    rng = np.random.default_rng(2)
    nz = np.flatnonzero(src.pages.any(axis=1))
    again = np.sort(rng.choice(nz, 300, replace=False))
    words = src.pages[again].view(np.uint64)
    words[:, 7] += np.uint64(1)
    src.pages[again] = words.view(np.uint8)
    before = s.copy()
    send(enc, dec, src, dst, again, 1 << 20)
    assert np.array_equal(src.pages, dst.pages)
    assert s.delta_pages - before.delta_pages + s.dup_pages - before.dup_pages == 300
    assert s.wire_bytes - before.wire_bytes < 300 * PAGE_SIZE * 0.02


def test_unchanged_zero_pages_are_not_sent() -> None:
    src, dst = ArrayMemory(100), ArrayMemory(100)
    enc, dec = PageEncoder(100), PageDecoder(100)
    assert enc.encode(np.arange(100), src.read_pages(np.arange(100))) == []
    src.pages[5] = 1
    send(enc, dec, src, dst, np.arange(100), 1 << 20)
    src.pages[5] = 0
    msgs = send(enc, dec, src, dst, np.arange(100), 1 << 20)
    assert len(msgs) == 1 and len(msgs[0]) < 100  # one run of one page
    assert np.array_equal(src.pages, dst.pages)


def test_many_gapped_zero_runs_split_into_bounded_messages() -> None:
    n = 4000
    src, dst = ArrayMemory(n), ArrayMemory(n)
    src.pages[:] = 7
    enc, dec = PageEncoder(n, CodecConfig(max_message=MIN_MESSAGE)), PageDecoder(n)
    send(enc, dec, src, dst, np.arange(n), MIN_MESSAGE)
    src.pages[::2] = 0
    src.pages[1::40] = 9  # nonzero pages between long stretches of runs
    msgs = send(enc, dec, src, dst, np.arange(n), MIN_MESSAGE)
    assert len(msgs) > 2
    assert np.array_equal(src.pages, dst.pages)


# -- property: random rounds of every kind of page, any configuration -----------------

N = 48
KINDS = ("zero", "text", "random", "pattern", "edit", "copy", "same")
round_st = st.lists(
    st.tuples(st.integers(0, N - 1), st.sampled_from(KINDS), st.integers(0, 2**32 - 1)),
    min_size=1, max_size=80)
config_st = st.builds(
    CodecConfig,
    cache_bytes=st.sampled_from([0, 3 * PAGE_SIZE, 16 * PAGE_SIZE, 1 << 20]),
    max_message=st.sampled_from([MIN_MESSAGE, 5 * PAGE_SIZE, 1 << 20]),
    dedup=st.booleans(),
    delta_max_words=st.sampled_from([0, 64, 256, 512]),
    dedup_entries=st.sampled_from([2, 1 << 20]),
)


@settings(max_examples=150, deadline=None)
@given(config=config_st, rounds=st.lists(round_st, min_size=1, max_size=5),
       splits=st.integers(1, 4))
def test_round_trip_property(config: CodecConfig, rounds: list[list[tuple[int, str, int]]],
                             splits: int) -> None:
    src, dst = ArrayMemory(N), ArrayMemory(N)
    enc, dec = PageEncoder(N, config), PageDecoder(N)
    for writes in rounds:
        for page, kind, seed in writes:
            rng = np.random.default_rng(seed)
            if kind == "zero":
                src.pages[page] = 0
            elif kind == "text":
                src.pages[page] = text_pages(rng, 1)[0]
            elif kind == "random":
                src.pages[page] = np.frombuffer(rng.bytes(PAGE_SIZE), np.uint8)
            elif kind == "pattern":
                src.pages[page] = pattern_pages(np.array([seed % 3]))[0]
            elif kind == "edit":
                src.pages[page, seed % PAGE_SIZE] ^= 1 + seed % 255
            elif kind == "copy":
                src.pages[page] = src.pages[seed % N]
        idx = np.unique([w[0] for w in writes])
        for part in np.array_split(idx, min(splits, len(idx))):
            send(enc, dec, src, dst, part, config.max_message)
        assert np.array_equal(src.pages, dst.pages)
    s = enc.stats
    assert s.zero_pages + s.full_pages + s.delta_pages + s.dup_pages == s.pages


def test_dedup_refers_to_an_index_only_while_it_holds_the_content() -> None:
    src, dst = ArrayMemory(8), ArrayMemory(8)
    enc, dec = PageEncoder(8, CodecConfig(cache_bytes=0)), PageDecoder(8)
    a, b = text_pages(np.random.default_rng(0), 2)
    src.pages[0] = a
    send(enc, dec, src, dst, np.array([0]), 1 << 20)
    # page 3 gets a's content while page 0 (its holder) changes later in the same chunk
    src.pages[3] = a
    src.pages[5] = b
    src.pages[0] = b
    send(enc, dec, src, dst, np.array([0, 3, 5]), 1 << 20)
    assert np.array_equal(src.pages, dst.pages)
    src.pages[6] = b  # b is held at 0 and 5 now: a dup
    before = enc.stats.dup_pages
    send(enc, dec, src, dst, np.array([6]), 1 << 20)
    assert enc.stats.dup_pages == before + 1
    assert np.array_equal(src.pages, dst.pages)


# -- bad messages ----------------------------------------------------------------------


def sample_messages() -> tuple[ArrayMemory, list[bytes]]:
    src = ArrayMemory(256)
    src.fill(seed=3)
    enc = PageEncoder(256, CodecConfig(max_message=64 << 10))
    idx = np.arange(256)
    msgs = enc.encode(idx, src.read_pages(idx))
    src.pages[10:20] ^= 1
    msgs += enc.encode(np.arange(10, 20), src.read_pages(np.arange(10, 20)))
    return src, [*msgs, enc.end(rounds=2, digest=src.digest())]


def test_end_marker_round_trip() -> None:
    src, msgs = sample_messages()
    out = PageDecoder(256).decode(msgs[-1])
    assert out == EndOfMemory(rounds=2, pages=266, digest=src.digest())


@pytest.mark.parametrize("seed", range(40))
def test_corrupt_or_truncated_message_is_refused_and_changes_nothing(seed: int) -> None:
    _, msgs = sample_messages()
    rng = np.random.default_rng(seed)
    msg = bytearray(msgs[seed % len(msgs)])
    if seed % 3 == 0:
        del msg[int(rng.integers(0, len(msg))):]
    else:
        at = int(rng.integers(0, len(msg)))
        msg[at] ^= 1 << int(rng.integers(0, 8))
    dst = ArrayMemory(256)
    dst.fill(seed=9)
    before = dst.pages.copy()
    with pytest.raises(ProtocolError):
        PageDecoder(256).feed(msg, dst)
    assert np.array_equal(before, dst.pages)


def forge(kind: int, counts: tuple[int, int, int, int], body: bytes, *, version: int = 1,
          flags: int = 0) -> bytes:
    head = HEADER.pack(version, kind, flags, *counts, len(body))
    return head + body + TRAILER.pack(xxhash.xxh3_64_intdigest(head + body))


def words(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}Q", *values)


@pytest.mark.parametrize(("message", "what"), [
    (forge(1, (0, 1, 0, 0), words(3) + bytes(PAGE_SIZE), version=2), "version"),
    (forge(9, (0, 0, 0, 0), b""), "type"),
    (forge(1, (0, 1, 0, 0), words(3) + bytes(PAGE_SIZE), flags=4), "flags"),
    (forge(1, (0, 1, 0, 0), words(300) + bytes(PAGE_SIZE)), "beyond"),
    (forge(1, (0, 2, 0, 0), words(3, 3) + bytes(2 * PAGE_SIZE)), "twice"),
    (forge(1, (1, 1, 0, 0), words(2, 3) + struct.pack("<I4x", 2) + bytes(PAGE_SIZE)),
     "zero page again"),
    (forge(1, (1, 0, 0, 0), words(250) + struct.pack("<I4x", 10)), "zero runs"),
    (forge(1, (0, 0, 0, 2), words(1, 2, 2, 7)), "dup"),
    (forge(1, (0, 1, 0, 0), words(3) + bytes(100)), "expected"),
    (forge(1, (0, 1, 0, 0), b"\x28\xb5\x2f\xfd" + bytes(30), flags=1), "decompress"),
])
def test_well_checksummed_but_invalid_messages_are_refused(message: bytes, what: str) -> None:
    dst = ArrayMemory(256)
    with pytest.raises(ProtocolError, match=what):
        PageDecoder(256).feed(message, dst)
    assert not dst.pages.any()


def test_decoded_batch_lists_every_page() -> None:
    _, msgs = sample_messages()
    original = ArrayMemory(256)
    original.fill(seed=3)
    dec = PageDecoder(256)
    batches = [dec.decode(m) for m in msgs[:-1]]
    assert all(isinstance(b, PageBatch) for b in batches)
    zeros = int((~original.pages.any(axis=1)).sum())
    assert sum(b.pages for b in batches if isinstance(b, PageBatch)) == 256 - zeros + 10
    assert msgs[0][1] == MsgType.PAGES
