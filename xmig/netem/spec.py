"""Link parameters of the WAN emulator and the parsers for their operator spellings.

``parse_rate("1gbit")`` → ``1_000_000_000`` (bits per second, SI prefixes);
``parse_duration("200ms")`` → ``0.2``; ``parse_fraction("0.1%")`` → ``0.001``;
``parse_size("4MiB")`` → ``4194304``. Junk raises :class:`~xmig.errors.ConfigError`.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from xmig.errors import ConfigError

#: Smallest default queue bound (bytes), whatever the bandwidth-delay product.
MIN_QUEUE_BYTES = 256 * 1024

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"
_RATE_UNITS = {
    "": 1,
    "bit": 1,
    "kbit": 10**3,
    "mbit": 10**6,
    "gbit": 10**9,
    "tbit": 10**12,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
}
_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}


def _split(text: str, what: str) -> tuple[float, str]:
    match = re.fullmatch(_NUMBER + r"\s*([a-zA-Zµ%/]*)", text.strip())
    if match is None:
        raise ConfigError(f"cannot read {text!r} as a {what}")
    return float(match.group(1)), match.group(2).lower()


def parse_rate(text: str | int) -> int:
    """Bits per second from ``"1gbit"``, ``"100mbit"``, ``"500kbit"``, ``"1e9"`` or an int.

    SI prefixes (k = 1000). Byte units such as ``"mbps"`` are refused as ambiguous.
    """
    if isinstance(text, bool):
        raise ConfigError(f"cannot read {text!r} as a rate")
    if isinstance(text, int):
        value: float = text
    else:
        number, unit = _split(text, "rate")
        unit = unit.removesuffix("/s")
        if unit not in _RATE_UNITS:
            raise ConfigError(
                f"unknown rate unit in {text!r}: use bit, kbit, mbit or gbit (bits per second)"
            )
        value = number * _RATE_UNITS[unit]
    if not math.isfinite(value) or value < 1:
        raise ConfigError(f"rate must be at least 1 bit/s, got {text!r}")
    return round(value)


def parse_duration(text: str | float) -> float:
    """A duration in seconds from ``"200ms"``, ``"1.5s"``, ``"50us"`` or a number of seconds."""
    if isinstance(text, bool):
        raise ConfigError(f"cannot read {text!r} as a duration")
    if isinstance(text, int | float):
        value = float(text)
    else:
        number, unit = _split(text, "duration")
        if unit not in _DURATION_UNITS:
            raise ConfigError(f"unknown duration unit in {text!r}: use s, ms or us")
        value = number * _DURATION_UNITS[unit]
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"duration must be finite and not negative, got {text!r}")
    return value


def parse_fraction(text: str | float) -> float:
    """A fraction in [0, 1] from ``"0.1%"`` (→ 0.001) or ``"0.001"``."""
    if isinstance(text, bool):
        raise ConfigError(f"cannot read {text!r} as a fraction")
    if isinstance(text, int | float):
        value = float(text)
    else:
        number, unit = _split(text, "fraction")
        if unit not in ("", "%"):
            raise ConfigError(f"a fraction is a number or a percentage, got {text!r}")
        value = number / 100 if unit == "%" else number
    if not (0.0 <= value <= 1.0):
        raise ConfigError(f"fraction must lie in [0, 1] (or 0%..100%), got {text!r}")
    return value


def parse_size(text: str | int) -> int:
    """A size in bytes from ``"262144"``, ``"256KiB"``, ``"4MB"`` (k = 1000, Ki = 1024)."""
    if isinstance(text, bool):
        raise ConfigError(f"cannot read {text!r} as a size")
    if isinstance(text, int):
        value: float = text
    else:
        number, unit = _split(text, "size")
        if unit not in _SIZE_UNITS:
            raise ConfigError(f"unknown size unit in {text!r}: use bytes, KiB, MiB, kB or MB")
        value = number * _SIZE_UNITS[unit]
    if not math.isfinite(value) or value < 1:
        raise ConfigError(f"size must be at least 1 byte, got {text!r}")
    return round(value)


def format_rate(rate_bps: int | None) -> str:
    """``1000000000`` → ``"1gbit"``; ``None`` → ``"unshaped"``."""
    if rate_bps is None:
        return "unshaped"
    for unit, factor in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if rate_bps >= factor:
            return f"{rate_bps / factor:g}{unit}"
    return f"{rate_bps}bit"


@dataclass(frozen=True)
class LinkSpec:
    """What the emulated link does, per direction (fwd = src → dst, rev = dst → src).

    ``rate_bps`` None leaves the link unshaped (no rate, no queue). Delays are one way.
    ``loss`` is the fraction of packets dropped at random in each direction, drawn from an
    RNG seeded with ``seed``. ``queue_bytes`` bounds the bytes waiting for the wire in each
    direction (tail drop); None means one bandwidth-delay product, at least 256 KiB.
    """

    rate_bps: int | None
    delay_fwd_s: float
    delay_rev_s: float
    loss: float = 0.0
    queue_bytes: int | None = None
    seed: int = 1

    def __post_init__(self) -> None:
        if self.rate_bps is not None and (
            isinstance(self.rate_bps, bool)
            or not isinstance(self.rate_bps, int)
            or self.rate_bps < 1
        ):
            raise ConfigError(f"rate_bps must be a positive int or None, got {self.rate_bps!r}")
        for name in ("delay_fwd_s", "delay_rev_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.loss, int | float) or not 0.0 <= self.loss <= 1.0:
            raise ConfigError(f"loss must lie in [0, 1], got {self.loss!r}")
        if self.queue_bytes is not None and (
            not isinstance(self.queue_bytes, int) or self.queue_bytes < 1
        ):
            raise ConfigError(
                f"queue_bytes must be a positive int or None, got {self.queue_bytes!r}"
            )
        if not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an int, got {self.seed!r}")

    @classmethod
    def symmetric(
        cls,
        *,
        rate_bps: int | None,
        rtt_s: float,
        loss: float = 0.0,
        queue_bytes: int | None = None,
        seed: int = 1,
    ) -> LinkSpec:
        """The same rate and loss both ways, half the round-trip time each way."""
        return cls(rate_bps, rtt_s / 2, rtt_s / 2, loss, queue_bytes, seed)

    @property
    def rtt_s(self) -> float:
        """The configured round-trip time (sum of both one-way delays)."""
        return self.delay_fwd_s + self.delay_rev_s

    def effective_queue_bytes(self) -> int | None:
        """The queue bound in force: ``queue_bytes``, else max(BDP, 256 KiB); None if unshaped."""
        if self.rate_bps is None:
            return None
        if self.queue_bytes is not None:
            return self.queue_bytes
        return max(MIN_QUEUE_BYTES, math.ceil(self.rate_bps / 8 * self.rtt_s))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form; :meth:`from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinkSpec:
        """Read :meth:`to_dict`'s form; unknown keys or bad values raise ConfigError."""
        try:
            return cls(**data)
        except TypeError as err:
            raise ConfigError(f"bad link spec {data!r}: {err}") from err

    def describe(self) -> str:
        """A one-line human summary."""
        if math.isclose(self.delay_fwd_s, self.delay_rev_s):
            delay = f"rtt {self.rtt_s * 1e3:g}ms"
        else:
            delay = f"delay {self.delay_fwd_s * 1e3:g}ms fwd / {self.delay_rev_s * 1e3:g}ms rev"
        queue = self.effective_queue_bytes()
        text = f"rate {format_rate(self.rate_bps)}, {delay}, loss {self.loss * 100:g}%"
        return text + (f", queue {queue} B" if queue is not None else "")
