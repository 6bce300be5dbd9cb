"""Sizes, rates, durations and fractions as an operator writes them, and back. Sans-IO.

Every flag, help text and README example of xmig goes through these parsers, so what is
printed reads back as what it says. Spaces between number and unit are allowed
(``"60 MB/s"``); a number may have a fraction or an exponent (``"1.5GiB"``, ``"1e9"``).

Sizes (:func:`parse_size`, bytes): ``4096``, ``512KiB``, ``256MiB``, ``4GiB``, ``1GB``.
``KiB MiB GiB TiB PiB`` (also ``Ki Mi Gi Ti Pi``) are powers of 1024; ``kB MB GB TB PB``
(also ``k M G T P``) are powers of 1000, as in SI: **1GB = 1G = 10^9 bytes**, 1GiB = 2^30.
``B`` is a byte; units are case-insensitive in sizes (``256mib`` = ``256MiB``).

Rates: bits per second (:func:`parse_bit_rate`: links, caps) as ``100kbit``, ``200mbit``,
``1gbit`` (``bit kbit mbit gbit tbit``, SI prefixes, case-insensitive, an optional ``/s``;
``100m`` = ``100mbit``); bytes per second (:func:`parse_byte_rate`: a guest's write rates) as
``60MB/s``, ``4MB/s``, ``1MiB/s`` (any size unit followed by ``/s``). Either parser takes
either kind, converted (``10MB/s`` = ``80mbit``); a bare number is the option's own unit
(bit/s, or bytes/s). In a rate a byte is an upper-case ``B``: ``10Mb/s`` and ``10mbps`` are
refused as ambiguous (write ``10mbit`` or ``10MB/s``). A size without ``/s`` (``60MB``) is
read as per second where the option counts bytes per second, and refused where it counts
bits (is ``10MB`` meant as megabits?).

Durations (:func:`parse_duration`, seconds): ``300ms``, ``5s``, ``1.5s``, ``60s``, ``2m``;
units ``ns us µs ms s m min h`` (``m`` is a minute); a bare number is seconds.

Fractions (:func:`parse_fraction`): ``0.1%`` (= 0.001) or ``0.001``, from 0 to 1.

Bad input raises :class:`~xmig.errors.ConfigError` saying what was given and which forms
are accepted. The ``format_*`` functions write a value so that its parser gives exactly that
value back (``format_size(268435456)`` = ``"256MiB"``, ``format_duration(0.3)`` = ``"300ms"``).
"""

from __future__ import annotations

import argparse
import decimal
import math
import re
from collections.abc import Callable
from decimal import Decimal
from typing import TypeVar

from xmig.errors import ConfigError

T = TypeVar("T")

#: SI and binary prefixes, lower-case (sizes and rates)
_SI = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}
_BINARY = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "pi": 2**50}
_PREFIXES = {**_SI, **_BINARY}
_DURATIONS = {"ns": Decimal("1e-9"), "us": Decimal("1e-6"), "µs": Decimal("1e-6"),
              "μs": Decimal("1e-6"), "ms": Decimal("0.001"), "s": Decimal(1),
              "m": Decimal(60), "min": Decimal(60), "h": Decimal(3600)}
_QUANTITY = re.compile(r"\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)"
                       r"\s*([A-Za-zµμ%/]*)\s*")
_MAX_EXPONENT = 24  #: a number above 10^24 in any unit is a mistake, not a quantity
_CONTEXT = decimal.Context(prec=60)

SIZE_FORMS = ("a number of bytes with an optional unit, e.g. 4096, 512KiB, 256MiB, 4GiB, 1GB "
              "(KiB, MiB, GiB, TiB: powers of 1024; kB, MB, GB, TB or k, M, G, T: powers of "
              "1000)")
BIT_RATE_FORMS = ("bits per second, e.g. 100kbit, 200mbit, 1gbit (k, m, g: powers of 1000; a "
                  "bare number is bit/s), or bytes per second with /s, e.g. 60MB/s")
BYTE_RATE_FORMS = ("bytes per second, e.g. 60MB/s, 4MB/s, 1MiB/s (a bare number is bytes/s), "
                   "or bits per second, e.g. 200mbit")
DURATION_FORMS = ("a duration, e.g. 300ms, 5s, 1.5s, 2m (units ns, us, ms, s, m, min, h; a "
                  "bare number is seconds)")
FRACTION_FORMS = "a fraction from 0 to 1, e.g. 0.001, or a percentage, e.g. 0.1%"


def _split(text: str | float, what: str, forms: str) -> tuple[Decimal, str]:
    """The number (exact) and the unit of ``text``; ConfigError if it is not one."""
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise ConfigError(f"cannot read {text!r} as {what}: want {forms}")
    unit = ""
    if isinstance(text, str):
        match = _QUANTITY.fullmatch(text)
        if match is None:
            raise ConfigError(f"cannot read {text!r} as {what}: want {forms}")
        number, unit = Decimal(match.group(1)), match.group(2)
    elif isinstance(text, float):
        if not math.isfinite(text):
            raise ConfigError(f"{what} must be finite, not {text!r}")
        number = Decimal(repr(text))
    else:
        number = Decimal(text)
    if number < 0:
        raise ConfigError(f"{what} cannot be negative: {text!r}")
    if not number.is_zero() and number.adjusted() > _MAX_EXPONENT:
        raise ConfigError(f"{text!r} is too large for {what}")
    return abs(number), unit


def _mul(number: Decimal, factor: int | Decimal) -> Decimal:
    return _CONTEXT.multiply(number, Decimal(factor))


def _to_int(value: Decimal) -> int:
    return int(value.to_integral_value(rounding=decimal.ROUND_HALF_EVEN))


def parse_size(text: str | int, *, allow_zero: bool = False) -> int:
    """Bytes from ``"4096"``, ``"512KiB"``, ``"256MiB"``, ``"4GiB"``, ``"1GB"`` (10^9) or an
    int; fractions of a byte are rounded. At least 1 byte unless ``allow_zero``."""
    number, unit = _split(text, "a size", SIZE_FORMS)
    prefix = unit.lower().removesuffix("b")
    if prefix not in _PREFIXES:
        raise ConfigError(f"unknown size unit in {text!r}: want {SIZE_FORMS}")
    value = _to_int(_mul(number, _PREFIXES[prefix]))
    if value < (0 if allow_zero else 1):
        raise ConfigError(f"a size must be at least {0 if allow_zero else 1} byte, "
                          f"got {text!r}")
    if value >= 2**63:
        raise ConfigError(f"{text!r} is too large for a size (2^63 bytes at most)")
    return value


def _rate_bits(text: str | float, *, bits: bool) -> Decimal:
    """A rate in bits per second; a bare number or prefix counts bits if ``bits``, else
    bytes."""
    forms = BIT_RATE_FORMS if bits else BYTE_RATE_FORMS
    number, unit = _split(text, "a rate", forms)
    per_second = unit.endswith("/s")
    unit = unit.removesuffix("/s")
    low = unit.lower()
    if low.endswith("ps") or (unit.endswith("b") and not low.endswith("bit")):
        raise ConfigError(f"ambiguous rate unit in {text!r}: write bits as mbit (e.g. "
                          "200mbit) and bytes per second as MB/s (e.g. 60MB/s)")
    if low.endswith("bit"):
        prefix, factor = low.removesuffix("bit"), 1
        table: dict[str, int] = _SI
    elif unit.endswith("B"):
        prefix, factor, table = low.removesuffix("b"), 8, _PREFIXES
        if not per_second and bits:
            raise ConfigError(f"{text!r} is a size, not a rate: say per second in bytes "
                              f"({str(text).strip()}/s) or give bits (e.g. 200mbit)")
    else:
        prefix, factor, table = low, (1 if bits else 8), (_SI if bits else _PREFIXES)
    if prefix not in table:
        raise ConfigError(f"unknown rate unit in {text!r}: want {forms}")
    return _mul(_mul(number, table[prefix]), factor)


def parse_bit_rate(text: str | int) -> int:
    """Bits per second from ``"200mbit"``, ``"1gbit"``, ``"100kbit"``, ``"2.5gbit/s"``,
    ``"1e9"``, ``"60MB/s"`` (= 480 Mbit/s) or an int; at least 1 bit/s."""
    value = _to_int(_rate_bits(text, bits=True))
    if value < 1:
        raise ConfigError(f"a rate must be at least 1 bit/s, got {text!r}")
    return value


def parse_byte_rate(text: str | float) -> float:
    """Bytes per second from ``"60MB/s"``, ``"1MiB/s"``, ``"60MB"``, ``"200mbit"``
    (= 25 MB/s), ``"0"`` or a number; 0 is allowed (no writes)."""
    return float(_CONTEXT.divide(_rate_bits(text, bits=False), Decimal(8)))


def parse_duration(text: str | float) -> float:
    """Seconds from ``"300ms"``, ``"5s"``, ``"1.5s"``, ``"2m"``, ``"50us"`` or a number of
    seconds; not negative."""
    number, unit = _split(text, "a duration", DURATION_FORMS)
    factor = Decimal(1) if unit == "" else _DURATIONS.get(unit.lower())
    if factor is None:
        raise ConfigError(f"unknown duration unit in {text!r}: want {DURATION_FORMS}")
    return float(_mul(number, factor))


def parse_fraction(text: str | float) -> float:
    """A fraction in [0, 1] from ``"0.1%"`` (= 0.001), ``"0.001"`` or a number."""
    number, unit = _split(text, "a fraction", FRACTION_FORMS)
    if unit not in ("", "%"):
        raise ConfigError(f"cannot read {text!r} as a fraction: want {FRACTION_FORMS}")
    value = _CONTEXT.divide(number, Decimal(100)) if unit == "%" else number
    if value > 1:
        raise ConfigError(f"a fraction lies between 0 and 1 (0% and 100%), got {text!r}")
    return float(value)


# -- writing values back ----------------------------------------------------------------


def _plain(value: Decimal) -> str:
    """``value`` in positional notation without trailing zeros."""
    return format(value.normalize(_CONTEXT), "f")


def _exact(value: int, base: str, units: list[tuple[str, int]]) -> str:
    """``value`` in the largest of ``units`` (name, factor) that divides it exactly (the
    binary and the decimal series both tried: the smallest number wins), else in ``base``."""
    best = (value, base)
    for name, factor in units:
        if value and value % factor == 0 and value // factor < best[0]:
            best = (value // factor, name)
    return f"{best[0]}{best[1]}"


_SIZE_UNITS = [("KiB", 2**10), ("MiB", 2**20), ("GiB", 2**30), ("TiB", 2**40),
               ("PiB", 2**50), ("kB", 10**3), ("MB", 10**6), ("GB", 10**9), ("TB", 10**12),
               ("PB", 10**15)]
_BIT_UNITS = [("kbit", 10**3), ("mbit", 10**6), ("gbit", 10**9), ("tbit", 10**12)]


def format_size(value: int) -> str:
    """``268435456`` → ``"256MiB"``, ``1000000000`` → ``"1GB"``, ``4097`` → ``"4097"``."""
    return _exact(value, "", _SIZE_UNITS)


def format_bit_rate(value: int) -> str:
    """``200000000`` → ``"200mbit"``, ``1234`` → ``"1234bit"``."""
    return _exact(value, "bit", _BIT_UNITS)


def format_byte_rate(value: float) -> str:
    """``60e6`` → ``"60MB/s"``, ``1048576`` → ``"1MiB/s"``, ``1.5`` → ``"1.5B/s"``."""
    if float(value).is_integer():
        return _exact(int(value), "B", _SIZE_UNITS) + "/s"
    return f"{_plain(Decimal(repr(float(value))))}B/s"


def format_duration(seconds: float) -> str:
    """``0.3`` → ``"300ms"``, ``1.5`` → ``"1.5s"``, ``5e-05`` → ``"50us"``, ``120`` →
    ``"120s"``."""
    value = Decimal(repr(float(seconds)))
    for unit, factor in (("s", Decimal(1)), ("ms", Decimal("0.001")), ("us", Decimal("1e-6"))):
        if value >= factor:
            return _plain(_CONTEXT.divide(value, factor)) + unit
    return _plain(_CONTEXT.divide(value, Decimal("1e-9"))) + "ns" if value else "0s"


def format_fraction(value: float) -> str:
    """``0.001`` → ``"0.1%"``."""
    return _plain(_mul(Decimal(repr(float(value))), 100)) + "%"


# -- argparse ---------------------------------------------------------------------------


def argtype(parse: Callable[[str], T], *, flag: str | None = None) -> Callable[[str], T]:
    """An argparse ``type=`` from one of these parsers. Without ``flag`` a bad value is
    argparse's usage error (exit 2); with it, a ConfigError naming the flag (for commands
    whose bad flags print as one red line). The converter's ``units_parser`` attribute is
    ``parse`` (the test of every help default finds the options by it)."""
    def convert(text: str) -> T:
        try:
            return parse(text)
        except ConfigError as err:
            if flag is not None:
                raise ConfigError(f"{flag}: {err}") from err
            raise argparse.ArgumentTypeError(str(err)) from err
    convert.__name__ = parse.__name__.removeprefix("parse_")  # argparse names it so
    convert.units_parser = parse  # type: ignore[attr-defined]
    return convert
