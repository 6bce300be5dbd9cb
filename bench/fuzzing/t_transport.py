"""Transport targets: the frame decoder, HELLO (and a server's resume of it), WELCOME (a
client's handling of it), and a sans-IO :class:`~xmig.transport.session.Session` fed
arbitrary frame sequences after the handshake (both sides)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import xxhash

from xmig.transport.frames import (
    CHECKSUM,
    DEFAULT_MAX_PAYLOAD,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
)
from xmig.transport.session import (
    Hello,
    MessageReceived,
    Session,
    SessionConfig,
)

from .core import Target
from .mutate import bytes_mutation, extreme_int, json_mutation

SID = "s" * 32
CONFIG = SessionConfig()
HELLO_KEYS = ("protocol", "session", "stream", "new", "max_payload", "received", "holding")
WELCOME_KEYS = ("ok", "session", "received", "holding", "code", "error")
JSON_MAX = 1 << 16  #: mutated JSON inputs at most (the nasty ones are longer)


@dataclass
class RawFrame:
    """A frame's fields as sent, right or wrong (the checksum is computed on encoding)."""

    type: int
    channel: int
    seq: int
    payload: bytes
    flags: int = 0
    version: int = VERSION
    magic: int = MAGIC
    length: int | None = None  #: None: the payload's

    def encode(self, *, good_crc: bool = True) -> bytes:
        n = len(self.payload) if self.length is None else self.length
        head = HEADER.pack(self.magic, self.version, self.type, self.channel, self.flags, 0,
                           n, self.seq)
        crc = xxhash.xxh3_64(head)
        crc.update(self.payload)
        digest = crc.intdigest() if good_crc else crc.intdigest() ^ 1
        return head + CHECKSUM.pack(digest) + self.payload


def parse_frames(data: bytes, limit: int = 64) -> tuple[list[RawFrame], bytes]:
    """Frames of a stream, checksums ignored; the bytes after the last whole frame."""
    out: list[RawFrame] = []
    pos = 0
    while pos + HEADER_SIZE <= len(data) and len(out) < limit:
        magic, ver, ftype, ch, flags, _r, n, seq = HEADER.unpack_from(data, pos)
        if pos + HEADER_SIZE + n > len(data):
            break
        payload = data[pos + HEADER_SIZE:pos + HEADER_SIZE + n]
        out.append(RawFrame(ftype, ch, seq, payload, flags, ver, magic))
        pos += HEADER_SIZE + n
    return out, data[pos:]


def fix_frames(data: bytes) -> bytes:
    """Recompute every whole frame's checksum."""
    frames, rest = parse_frames(data, limit=1 << 16)
    return b"".join(f.encode() for f in frames) + rest


_FIELDS = ("type", "channel", "seq", "flags", "version", "magic", "length")
_WIDTH = {"type": 1, "channel": 1, "seq": 8, "flags": 1, "version": 1, "magic": 2, "length": 4}


def _mutate_frame(f: RawFrame, rng: random.Random) -> None:
    op = rng.random()
    if op < 0.45:
        name = rng.choice(_FIELDS)
        if name == "type" and rng.random() < 0.6:
            f.type = rng.choice((*range(1, 8), 0, 8, 255))
        elif name == "channel" and rng.random() < 0.6:
            f.channel = rng.choice((0, 1, 2, 3, 4, 5, 255))
        else:
            cur = getattr(f, name) or 0
            setattr(f, name, extreme_int(rng, _WIDTH[name], cur, len(f.payload)))
    elif f.type in (FrameType.HELLO, FrameType.WELCOME) and op < 0.8:
        keys = HELLO_KEYS if f.type == FrameType.HELLO else WELCOME_KEYS
        f.payload = json_mutation(f.payload, rng, keys, max_len=JSON_MAX)
    else:
        f.payload = bytes_mutation(f.payload, rng, max_len=1 << 17)


def _new_frame(rng: random.Random) -> RawFrame:
    ftype = rng.choice((1, 1, 1, 2, 2, 5, 6, 7, 3, 4))
    channel = rng.choice((0, 1, 2, 3, 4, 9))
    seq = rng.choice((0, 1, 2, 3, rng.getrandbits(20), 1 << 20, (1 << 64) - 1))
    payload = rng.choice((b"", b"x", rng.randbytes(rng.randrange(300))))
    if rng.random() < 0.02:  # longer than the decoder's scratch buffer
        payload = bytes(70000)
    return RawFrame(ftype, channel, seq, payload)


def mutate_stream(data: bytes, rng: random.Random) -> bytes:
    """Structure-aware: edit frames (fields, payloads), add, drop, repeat or swap them;
    re-encode with good checksums most of the time."""
    frames, rest = parse_frames(data)
    for _ in range(rng.choice((1, 1, 2, 3))):
        op = rng.random()
        k = rng.randrange(len(frames)) if frames else 0
        if not frames or op < 0.15:
            frames.insert(k, _new_frame(rng))
        elif op < 0.65:
            _mutate_frame(frames[k], rng)
        elif op < 0.75:
            del frames[k]
        elif op < 0.85:
            frames[k:k] = [frames[k]] * rng.choice((1, 1, 2, 8))
        else:
            j = rng.randrange(len(frames))
            frames[k], frames[j] = frames[j], frames[k]
    good = rng.random() < 0.9
    out = b"".join(f.encode(good_crc=good or rng.random() < 0.5) for f in frames)
    if rng.random() < 0.1:
        out = out[:rng.randrange(len(out) + 1)]
    return out + (rest if rng.random() < 0.3 else b"")


# -- frames ------------------------------------------------------------------------------


def _frame_seeds() -> list[bytes]:
    hello = Hello(SID, 1, True, DEFAULT_MAX_PAYLOAD).encode()
    return [
        hello,
        encode_frame(FrameType.DATA, 3, 0, b"page" * 100) + encode_frame(FrameType.ACK, 3, 7),
        encode_frame(FrameType.PING, 0, 5) + encode_frame(FrameType.PONG, 0, 5)
        + encode_frame(FrameType.CLOSE, 0, 0, "bye ✓".encode()),
        encode_frame(FrameType.DATA, 0, 1, bytes(70000)),  # > the decoder's scratch buffer
        encode_frame(FrameType.WELCOME, 0, 0, b'{"ok": true}') + hello,
    ]


def run_frames(data: bytes) -> str:
    """Feed ``data`` in pieces cut where its hash says (both ways in), take every frame."""
    dec = FrameDecoder(DEFAULT_MAX_PAYLOAD)
    cut = random.Random(xxhash.xxh32_intdigest(data))
    pos, n = 0, 0
    while pos < len(data):
        step = cut.choice((len(data), 7, 28, 29, 1000, 65536, 1 if len(data) < 512 else 100))
        piece = data[pos:pos + step]
        if cut.random() < 0.5:
            dec.feed(piece)
        else:  # the BufferedProtocol path: write into get_buffer(), then buffer_updated
            buf = dec.get_buffer()
            k = min(len(buf), len(piece))
            buf[:k] = piece[:k]
            dec.buffer_updated(k)
            step = k
        pos += step
        while dec.next_frame() is not None:
            n += 1
    dec.close()
    return "frames" if n else "nothing"


# -- HELLO and resume (server side) ------------------------------------------------------


def _established_server() -> Session:
    """A server session that has sent a few messages (so a resume has something to name)."""
    s = Session(SID, client=False, config=CONFIG, now=0.0)
    s.add_connection(1, 0.0, hello=Hello(SID, 1, True, CONFIG.max_payload))
    for ch in (0, 3):
        for _ in range(3):
            s.send(ch, b"m")
    while s.frame_to_send(1, 0.0) is not None:
        pass
    s.connection_lost(1, 1.0)
    return s


def _hello_seeds() -> list[bytes]:
    return [
        Hello(SID, 1, True, DEFAULT_MAX_PAYLOAD).encode()[HEADER_SIZE:],
        Hello(SID, 2, False, DEFAULT_MAX_PAYLOAD, {0: 2, 3: 1}, {3: [2]}).encode()[HEADER_SIZE:],
        Hello(SID, 3, False, DEFAULT_MAX_PAYLOAD, {0: 3, 3: 3}, {}).encode()[HEADER_SIZE:],
    ]


def run_hello(data: bytes) -> str:
    """HELLO's payload: decode it, then let an established server resume with it."""
    hello = Hello.decode(Frame(FrameType.HELLO, 0, 0, data))
    server = _established_server()
    server.add_connection(2, 2.0, hello=hello)
    return f"resumed-{server.state.value}"


# -- WELCOME (client side) ---------------------------------------------------------------


def _welcome_seeds() -> list[bytes]:
    return [
        json.dumps({"ok": True, "session": SID, "received": {}, "holding": {}}).encode(),
        json.dumps({"ok": True, "session": SID, "received": {"0": 1, "3": 2},
                    "holding": {"3": [3]}}).encode(),
        json.dumps({"ok": False, "code": "unknown-session", "error": "gone"}).encode(),
        json.dumps({"ok": False, "code": "incompatible", "error": "no"}).encode(),
    ]


def _client() -> Session:
    s = Session(SID, client=True, config=CONFIG, now=0.0)
    s.add_connection(1, 0.0)
    for ch in (0, 3):
        for _ in range(4):
            s.send(ch, b"m")
    while s.frame_to_send(1, 0.0) is not None:  # HELLO, then DATA ahead of WELCOME
        pass
    return s


def run_welcome(data: bytes) -> str:
    s = _client()
    s.receive_data(1, encode_frame(FrameType.WELCOME, 0, 0, data), 0.1)
    return f"welcome-{s.state.value}"


# -- a session fed frames after the handshake --------------------------------------------


def _session_seeds() -> list[bytes]:
    data = [encode_frame(FrameType.DATA, ch, seq, b"m" * seq) for ch in (0, 3) for seq in (0, 1)]
    body = b"".join(data) + encode_frame(FrameType.ACK, 0, 1) + encode_frame(FrameType.PING, 0, 9)
    welcome = encode_frame(FrameType.WELCOME, 0, 0, _welcome_seeds()[0])
    close = encode_frame(FrameType.CLOSE, 0, 0, b"done")
    return [b"\x00" + body, b"\x00" + body + close, b"\x01" + welcome + body,
            b"\x01" + welcome + encode_frame(FrameType.PONG, 0, 1) + close,
            b"\x00" + encode_frame(FrameType.DATA, 4, 2, b"x") + encode_frame(FrameType.DATA, 4,
                                                                                 0, b"y")]


def run_session(data: bytes) -> str:
    """First byte even: a server after HELLO; odd: a client after HELLO (the stream should
    begin with WELCOME). The rest arrives on the connection; the application consumes what
    is delivered, and the session writes what it wants to."""
    mode, stream = (data[0], data[1:]) if data else (0, b"")
    if mode & 1:
        s = _client()
    else:
        s = Session(SID, client=False, config=CONFIG, now=0.0)
        s.add_connection(1, 0.0, hello=Hello(SID, 1, True, CONFIG.max_payload))
        s.send(0, b"hello")
    s.receive_data(1, stream, 0.5)
    delivered = 0
    while (ev := s.next_event()) is not None:
        if isinstance(ev, MessageReceived):
            s.consume(ev.channel, len(ev.data), 0.5)
            delivered += 1
    for _ in range(256):
        if s.frame_to_send(1, 1.0) is None:
            break
    s.handle_timer(1.0)
    return f"{s.state.value}-{'delivered' if delivered else 'none'}"


def _deep(n: int) -> bytes:
    return b"[" * n


def _hello_nasty() -> list[bytes]:
    base = json.loads(_hello_seeds()[1])
    nasty = [_deep(200000), b'{"a":' * 100000, b"[" * 5000 + b"]" * 5000]
    for key, val in (("received", [1]), ("holding", [[1]]), ("received", {"0": "Infinity"}),
                     ("holding", {"0": 5}), ("stream", None), ("new", [])):
        nasty.append(json.dumps({**base, key: val}).encode())
    nasty.append(json.dumps(base).encode().replace(b'{"0": 2', b'{"0": Infinity'))
    nasty.append(json.dumps({**base, "holding": {"3": list(range(100000))}}).encode())
    return nasty


def _welcome_nasty() -> list[bytes]:
    return [_deep(200000), b'{"ok": true, "received": [1]}', b'{"ok": true, "received": '
            b'{"0": Infinity}}', b'{"ok": true, "received": {"0": 1e400}}',
            b'{"ok": true, "received": {"0": 99999999999999999999}}', b'[' * 5000]


def _session_nasty() -> list[bytes]:
    empty = encode_frame(FrameType.DATA, 3, 0, b"")
    flood = b"".join(encode_frame(FrameType.DATA, 3, i, b"") for i in range(5000))
    far = encode_frame(FrameType.DATA, 3, (1 << 64) - 1, b"x")
    ack = encode_frame(FrameType.ACK, 0, (1 << 64) - 1)
    return [b"\x00" + flood, b"\x00" + empty * 5000, b"\x00" + far, b"\x00" + ack,
            b"\x01" + ack, b"\x01" + encode_frame(FrameType.WELCOME, 0, 0, _deep(200000))]


def _frames_nasty() -> list[bytes]:
    huge = RawFrame(FrameType.DATA, 3, 0, b"", length=(1 << 32) - 1).encode()
    limit = RawFrame(FrameType.DATA, 3, 0, b"", length=DEFAULT_MAX_PAYLOAD).encode()
    return [huge, limit, limit + bytes(100), b"XM" * 50000,
            encode_frame(FrameType.PING, 0, 0) * 5000]


TARGETS = [
    Target("frames", run_frames, _frame_seeds, mutate_stream, fix_frames, _frames_nasty,
           max_len=1 << 17),
    Target("hello", run_hello, _hello_seeds,
           lambda d, r: json_mutation(d, r, HELLO_KEYS, JSON_MAX), None, _hello_nasty,
           max_len=JSON_MAX),
    Target("welcome", run_welcome, _welcome_seeds,
           lambda d, r: json_mutation(d, r, WELCOME_KEYS, JSON_MAX), None, _welcome_nasty,
           max_len=JSON_MAX),
    Target("session", run_session, _session_seeds,
           lambda d, r: d[:1] + mutate_stream(d[1:], r), lambda d: d[:1] + fix_frames(d[1:]),
           _session_nasty, max_len=1 << 15),
]
