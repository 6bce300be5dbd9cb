"""The frame codec, without sockets: exact bytes, every error typed, fuzzed decoder."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xmig.errors import (
    BadMagicError,
    FrameChecksumError,
    FrameError,
    IntegrityError,
    OversizedFrameError,
    TruncatedFrameError,
    UnknownFrameTypeError,
    UnsupportedVersionError,
)
from xmig.transport.frames import (
    HEADER_SIZE,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
)


def test_header_layout_is_exact() -> None:
    data = encode_frame(FrameType.DATA, 3, 0x0102030405060708, b"abc", flags=0x5A)
    assert len(data) == HEADER_SIZE + 3 == 31
    assert data[:2] == b"XM"
    assert data[2:8] == bytes([1, FrameType.DATA, 3, 0x5A, 0, 0])
    assert data[8:12] == (3).to_bytes(4, "big")
    assert data[12:20] == bytes.fromhex("0102030405060708")
    assert data[28:] == b"abc"


def test_roundtrip_split_at_every_byte() -> None:
    frames = [
        encode_frame(FrameType.DATA, 4, 7, b"x" * 1000),
        encode_frame(FrameType.ACK, 3, 9),
        encode_frame(FrameType.PING, 0, 1),
    ]
    stream = b"".join(frames)
    for cut in range(len(stream) + 1):
        dec = FrameDecoder()
        out: list[Frame] = []
        for part in (stream[:cut], stream[cut:]):
            dec.feed(part)
            while (f := dec.next_frame()) is not None:
                out.append(f)
        assert [(f.type, f.channel, f.seq, len(f.payload)) for f in out] == [
            (FrameType.DATA, 4, 7, 1000), (FrameType.ACK, 3, 9, 0), (FrameType.PING, 0, 1, 0)
        ]
        dec.close()


@pytest.mark.parametrize(
    ("offset", "value", "error"),
    [
        (0, 0x00, BadMagicError),
        (2, 0x09, UnsupportedVersionError),
        (3, 0x7F, UnknownFrameTypeError),
        (4, 0x04, FrameChecksumError),  # channel changed: header checksum fails
        (12, 0x01, FrameChecksumError),  # seq changed
        (HEADER_SIZE + 5, ord("Y"), FrameChecksumError),  # payload byte changed
    ],
)
def test_tampered_byte_raises_typed_error_and_delivers_nothing(
    offset: int, value: int, error: type[FrameError]
) -> None:
    good = encode_frame(FrameType.DATA, 3, 1, b"payload-bytes")
    bad = bytearray(good)
    bad[offset] = value
    dec = FrameDecoder()
    dec.feed(good + bytes(bad) + good)
    first = dec.next_frame()  # the good frame before the bad one is delivered
    assert first is not None and first.payload == b"payload-bytes"
    with pytest.raises(error):
        dec.next_frame()
    dec.feed(good)
    with pytest.raises(error):  # it stays refused: nothing after the bad frame either
        dec.next_frame()


def test_checksum_error_is_an_integrity_error() -> None:
    assert issubclass(FrameChecksumError, IntegrityError)


def test_oversized_frame_is_refused_from_the_header_alone() -> None:
    dec = FrameDecoder(max_payload=1024)
    data = encode_frame(FrameType.DATA, 3, 0, b"z" * 2048)
    dec.feed(data[:HEADER_SIZE])  # the payload never needs to arrive
    with pytest.raises(OversizedFrameError) as info:
        dec.next_frame()
    assert (info.value.length, info.value.limit) == (2048, 1024)


def test_buffered_protocol_path_writes_payloads_in_place() -> None:
    """get_buffer/buffer_updated, as asyncio's BufferedProtocol drives it, in odd sizes."""
    big = bytes(range(256)) * 1024  # 256 KiB: delivered in the buffer it was read into
    stream = encode_frame(FrameType.DATA, 3, 1, big) + encode_frame(FrameType.ACK, 3, 2)
    dec = FrameDecoder()
    pos = 0
    sizes = [5, 30, 70_000, 1, 200_000]
    while pos < len(stream):
        buf = dec.get_buffer()
        n = min(len(buf), len(stream) - pos, sizes[pos % len(sizes)])
        buf[:n] = stream[pos : pos + n]
        dec.buffer_updated(n)
        pos += n
    data, ack = dec.next_frame(), dec.next_frame()
    assert data is not None and data.payload == big and isinstance(data.payload, bytearray)
    assert ack is not None and (ack.type, ack.seq) == (FrameType.ACK, 2)
    assert dec.next_frame() is None and dec.buffered == 0


def test_truncated_stream_raises_on_close() -> None:
    dec = FrameDecoder()
    dec.feed(encode_frame(FrameType.DATA, 3, 0, b"abcdef")[:-2])
    assert dec.next_frame() is None
    with pytest.raises(TruncatedFrameError):
        dec.close()


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.binary(max_size=512), st.integers(min_value=0, max_value=600))
def test_decoder_fuzz_only_typed_errors(blob: bytes, cut: int) -> None:
    """Arbitrary bytes, alone or after a valid frame: frames or FrameError, never a crash."""
    valid = encode_frame(FrameType.DATA, 1, 5, b"ok")
    for stream in (blob, valid + blob, valid[: cut % len(valid)] + blob):
        dec = FrameDecoder(max_payload=4096)
        dec.feed(stream)
        try:
            while (f := dec.next_frame()) is not None:
                assert isinstance(f.type, FrameType)
                assert len(f.payload) <= 4096
        except FrameError:
            pass


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.binary(max_size=2000), st.integers(0, 255), st.integers(0, 2**64 - 1))
def test_roundtrip_property(payload: bytes, channel: int, seq: int) -> None:
    dec = FrameDecoder()
    dec.feed(encode_frame(FrameType.DATA, channel, seq, payload))
    frame = dec.next_frame()
    assert frame == Frame(FrameType.DATA, channel, seq, payload)
    assert dec.next_frame() is None
