"""Link parameters of the WAN emulator, and its parsers for their operator spellings.

The parsers are :mod:`xmig.units`' (one parser for every size, rate and duration of xmig),
under the names this package has always exported: ``parse_rate("1gbit")`` →
``1_000_000_000`` (bits per second, :func:`~xmig.units.parse_bit_rate`);
``parse_duration("200ms")`` → ``0.2``; ``parse_fraction("0.1%")`` → ``0.001``;
``parse_size("4MiB")`` → ``4194304``. Junk raises :class:`~xmig.errors.ConfigError`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from xmig.errors import ConfigError
from xmig.units import (
    format_bit_rate,
    format_duration,
    format_fraction,
    format_size,
    parse_duration,
    parse_fraction,
    parse_size,
)
from xmig.units import parse_bit_rate as parse_rate

__all__ = ["MIN_QUEUE_BYTES", "LinkSpec", "format_rate", "parse_duration", "parse_fraction",
           "parse_rate", "parse_size"]

#: Smallest default queue bound (bytes), whatever the bandwidth-delay product.
MIN_QUEUE_BYTES = 256 * 1024


def format_rate(rate_bps: int | None) -> str:
    """``1000000000`` → ``"1gbit"`` (what :func:`parse_rate` reads back); ``None`` →
    ``"unshaped"``."""
    return "unshaped" if rate_bps is None else format_bit_rate(rate_bps)


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
        """A one-line human summary, in units :mod:`xmig.units` reads back."""
        if math.isclose(self.delay_fwd_s, self.delay_rev_s):
            delay = f"rtt {format_duration(self.rtt_s)}"
        else:
            delay = (f"delay {format_duration(self.delay_fwd_s)} fwd / "
                     f"{format_duration(self.delay_rev_s)} rev")
        queue = self.effective_queue_bytes()
        text = f"rate {format_rate(self.rate_bps)}, {delay}, loss {format_fraction(self.loss)}"
        return text + (f", queue {format_size(queue)}" if queue is not None else "")
