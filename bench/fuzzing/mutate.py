"""Mutations shared by the targets: byte level (bit flips, extreme integers, truncation,
splicing, repeats) and JSON level (wrong types, extreme numbers, deep nesting)."""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable, Sequence
from typing import Any

_REPEATS = (b"\x00", b"\xff", b"[", b"{", b'"', b"0", b"9", b" ", b"\\", b"\x80")


def extremes(width: int, current: int = 0, size: int = 0) -> list[int]:
    """Values worth trying in an unsigned ``width``-byte field."""
    top = (1 << (8 * width)) - 1
    half = 1 << (8 * width - 1)
    vals = [0, 1, 2, top, top - 1, half, half - 1, current + 1, current - 1, size, size + 1,
            size - 1, 4096, 4095, 4097, 1 << 20, (1 << 20) + 1, 1 << 30, 1 << 32, 1 << 40,
            (1 << 31) - 1, 1 << 31]
    return [v & top for v in vals]


def extreme_int(rng: random.Random, width: int = 8, current: int = 0, size: int = 0) -> int:
    if rng.random() < 0.2:
        return rng.getrandbits(8 * width)
    return rng.choice(extremes(width, current, size))


def _set_int(data: bytearray, rng: random.Random) -> None:
    width = rng.choice((1, 2, 4, 8))
    if len(data) < width:
        return
    pos = rng.randrange(len(data) - width + 1)
    if rng.random() < 0.5:
        pos -= pos % width
    order = rng.choice(("big", "little"))
    cur = int.from_bytes(data[pos:pos + width], order)  # type: ignore[arg-type]
    val = extreme_int(rng, width, cur, len(data))
    data[pos:pos + width] = val.to_bytes(width, order)  # type: ignore[arg-type]


def _flip(data: bytearray, rng: random.Random) -> None:
    if data:
        for _ in range(rng.choice((1, 1, 1, 2, 4))):
            pos = rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)


def _set_byte(data: bytearray, rng: random.Random) -> None:
    if data:
        data[rng.randrange(len(data))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))


def _truncate(data: bytearray, rng: random.Random) -> None:
    del data[rng.randrange(len(data) + 1):]


def _delete(data: bytearray, rng: random.Random) -> None:
    if data:
        a = rng.randrange(len(data))
        del data[a:a + rng.choice((1, 2, 4, 8, rng.randrange(1, len(data) + 1)))]


def _dup(data: bytearray, rng: random.Random) -> None:
    if data:
        a = rng.randrange(len(data))
        piece = data[a:a + rng.randrange(1, 64)]
        at = rng.randrange(len(data) + 1)
        data[at:at] = piece * rng.choice((1, 1, 2, 16))


def _repeat(data: bytearray, rng: random.Random) -> None:
    at = rng.randrange(len(data) + 1)
    data[at:at] = rng.choice(_REPEATS) * rng.choice((1, 8, 64, 512, 4096))


def _random(data: bytearray, rng: random.Random) -> None:
    at = rng.randrange(len(data) + 1)
    data[at:at] = rng.randbytes(rng.randrange(1, 32))


_BYTE_OPS: tuple[Callable[[bytearray, random.Random], None], ...] = (
    _set_int, _set_int, _set_int, _flip, _flip, _set_byte, _truncate, _delete, _dup, _repeat,
    _random,
)


def bytes_mutation(data: bytes, rng: random.Random, pool: Sequence[bytes] = (),
                   max_len: int = 1 << 16) -> bytes:
    """1 to 4 stacked byte-level mutations, or a splice with another input of ``pool``."""
    buf = bytearray(data)
    if pool and rng.random() < 0.1:
        other = rng.choice(pool)
        buf = buf[:rng.randrange(len(buf) + 1)] + other[rng.randrange(len(other) + 1):]
    for _ in range(rng.choice((1, 1, 2, 3, 4))):
        rng.choice(_BYTE_OPS)(buf, rng)
    return bytes(buf[:max_len])


# -- JSON --------------------------------------------------------------------------------

_WEIRD: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 2, 1 << 31, 1 << 53, 1 << 63, 1 << 64, -(1 << 63) - 1,
    10 ** 30, 1e308, -1e308, 0.5, 1e-320, float("inf"), float("-inf"), float("nan"), "", "x",
    "0", "-1", "1e9", "../../../etc/passwd", "/etc/passwd", "a/b", "..", "\x00", "\ud800",
    "é\u202e", "x" * 300, [], {}, [0], [[]], {"": None}, {"0": 0}, [1, 2, 3], {"a": {"b": []}},
)


def weird_value(rng: random.Random) -> Any:
    if rng.random() < 0.1:
        depth = rng.choice((10, 100, 900, 2000))
        inner: Any = rng.choice((0, None, "", []))
        for _ in range(depth):
            inner = [inner] if rng.random() < 0.7 else {"a": inner}
        return inner
    return rng.choice(_WEIRD)


def _paths(obj: Any, limit: int = 64) -> list[tuple[Any, Any]]:
    """(container, key) pairs of ``obj``'s values, breadth first, at most ``limit``."""
    out: list[tuple[Any, Any]] = []
    todo = [obj]
    while todo and len(out) < limit:
        cur = todo.pop(0)
        items: Sequence[tuple[Any, Any]] = (
            list(cur.items()) if isinstance(cur, dict) else list(enumerate(cur))
            if isinstance(cur, list) else [])
        for k, v in items:
            out.append((cur, k))
            if isinstance(v, dict | list):
                todo.append(v)
    return out


def _number(val: float, rng: random.Random) -> Any:
    """A number near ``val``, or it in another type."""
    k = rng.randrange(5)
    try:
        return (-val if k == 0 else val + 1 if k == 1 else val * 2 ** 40 if k == 2
                else str(val) if k == 3 else float(val))
    except (OverflowError, ValueError):  # float() of a huge int, str() of > 4300 digits
        return weird_value(rng)


def _mutate_obj(obj: Any, rng: random.Random, keys: Sequence[str]) -> Any:
    paths = _paths(obj)
    op = rng.random()
    if not paths or op < 0.08:
        return weird_value(rng) if rng.random() < 0.5 else [obj]
    cont, key = rng.choice(paths)
    if op < 0.55:
        cont[key] = weird_value(rng)
    elif op < 0.65 and isinstance(cont, dict):
        del cont[key]
    elif op < 0.75 and isinstance(cont, dict):
        cont[rng.choice((*keys, "extra", ""))] = weird_value(rng)
    elif op < 0.85:
        val = cont[key]
        if isinstance(val, bool):
            cont[key] = not val
        elif isinstance(val, int | float):
            cont[key] = _number(val, rng)
        elif isinstance(val, str):
            cont[key] = rng.choice((val * (50 if len(val) < 1000 else 1), val[:1], val.upper(),
                                    val + "\ud800", [val]))
        else:
            cont[key] = weird_value(rng)
    elif isinstance(cont, list):
        cont.extend([cont[key]] * rng.choice((1, 10, 1000)))
    else:
        cont[key] = [cont[key]]
    return obj


def _text_mutation(text: bytes, rng: random.Random) -> bytes:
    op = rng.random()
    at = rng.randrange(len(text) + 1)
    if op < 0.3:
        depth = rng.choice((50, 999, 1001, 5000, 20000))
        opener = rng.choice((b"[", b"{\"a\":", b"[{\"a\":"))
        return text[:at] + opener * depth + text[at:]
    if op < 0.5:
        return text[:at] + rng.choice((b"NaN", b"Infinity", b"-Infinity", b"1" * 5000, b"1e999",
                                       b"-0", b"\"\\ud800\"", b"\"\\u0000\"", b"\xff\xfe",
                                       b"\xed\xa0\x80")) + text[at:]
    if op < 0.6 and text.startswith(b"{"):  # a duplicate key: the last one wins
        return b"{\"type\": \"go\", " + text[1:]
    return text[:at]


def json_mutation(data: bytes, rng: random.Random, keys: Sequence[str] = (),
                  max_len: int = 1 << 18) -> bytes:
    """Mutate the JSON value in ``data`` (byte level if it does not parse)."""
    if rng.random() < 0.25:
        return _text_mutation(data, rng)[:max_len]
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return bytes_mutation(data, rng, max_len=max_len)
    for _ in range(rng.choice((1, 1, 2, 3))):
        obj = _mutate_obj(obj, rng, keys)
    if not _fits(obj, max_len):  # repeats of repeats (shared, so cheap) would print huge
        return _text_mutation(data, rng)[:max_len]
    try:
        text = json.dumps(obj).encode("utf-8", "surrogatepass")
    except (ValueError, RecursionError):
        return data
    return text[:max_len]


def _fits(obj: Any, limit: int) -> bool:
    """Whether ``obj`` prints in about ``limit`` bytes (every value at least one byte, each
    time a shared one occurs), without printing it."""
    todo = [obj]
    size = 0
    while todo:
        cur = todo.pop()
        if isinstance(cur, dict):
            todo += cur.values()
            size += sum(len(k) + 3 for k in cur)
        elif isinstance(cur, list):
            todo += cur
        size += len(cur) if isinstance(cur, str) else 1
        if size > limit:
            return False
    return True


# -- length-prefixed sequences of messages -----------------------------------------------

_LEN = struct.Struct(">I")


def join_messages(messages: Sequence[bytes]) -> bytes:
    """Messages as one input: each prefixed by its u32 length."""
    return b"".join(_LEN.pack(len(m)) + m for m in messages)


def split_messages(data: bytes, limit: int = 64) -> list[bytes]:
    """:func:`join_messages`' messages (a short last one takes what is left)."""
    out: list[bytes] = []
    pos = 0
    while pos < len(data) and len(out) < limit:
        n = _LEN.unpack_from(data, pos)[0] if pos + 4 <= len(data) else len(data)
        pos += 4
        out.append(data[pos:pos + n])
        pos += n
    return out


def sequence_mutation(data: bytes, rng: random.Random, one: Callable[[bytes], bytes]) -> bytes:
    """Mutate one message of a :func:`join_messages` input with ``one``, or the sequence:
    drop, duplicate or swap messages."""
    msgs = split_messages(data)
    if not msgs:
        return data
    op = rng.random()
    k = rng.randrange(len(msgs))
    if op < 0.7:
        msgs[k] = one(msgs[k])
    elif op < 0.8:
        del msgs[k]
    elif op < 0.9:
        msgs.insert(k, msgs[k])
    else:
        j = rng.randrange(len(msgs))
        msgs[k], msgs[j] = msgs[j], msgs[k]
    return join_messages(msgs)
