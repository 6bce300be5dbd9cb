"""xmig.units: one parser for sizes, rates, durations and fractions; what the help and the
README print reads back as what it says, and formatting a value then parsing it gives it
back."""

from __future__ import annotations

import argparse
import itertools
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xmig.cli import build_parser
from xmig.errors import ConfigError
from xmig.units import (
    format_bit_rate,
    format_byte_rate,
    format_duration,
    format_fraction,
    format_size,
    parse_bit_rate,
    parse_byte_rate,
    parse_duration,
    parse_fraction,
    parse_size,
)

README = Path(__file__).resolve().parent.parent / "README.md"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@pytest.mark.parametrize(
    ("text", "value"),
    [("256MiB", 256 * MiB), ("1GiB", GiB), ("4GiB", 4 * GiB), ("512KiB", 512 * KiB),
     ("4096", 4096), ("1G", 10**9), ("1GB", 10**9), ("1gb", 10**9), ("4MB", 4_000_000),
     ("1kB", 1000), ("1KB", 1000), ("1k", 1000), ("2Ki", 2048), ("1.5GiB", 3 * GiB // 2),
     ("256 MiB", 256 * MiB), ("1TiB", 1 << 40), ("100B", 100), (4096, 4096)],
)
def test_sizes(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [("200mbit", 200_000_000), ("1gbit", 10**9), ("500mbit", 500_000_000),
     ("100kbit", 100_000), ("1Gbit", 10**9), ("2.5gbit/s", 2_500_000_000), ("1e9", 10**9),
     ("64000", 64_000), ("100m", 100_000_000), ("200 Mbit/s", 200_000_000),
     ("10MB/s", 80_000_000), ("1MiB/s", 8 * MiB), (10_000, 10_000)],
)
def test_bit_rates(text: str | int, value: int) -> None:
    assert parse_bit_rate(text) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [("60MB/s", 60e6), ("20MB/s", 20e6), ("2MB/s", 2e6), ("10MB/s", 10e6), ("4MB/s", 4e6),
     ("1MiB/s", float(MiB)), ("60 MB/s", 60e6), ("60MB", 60e6), ("0", 0.0), ("4096", 4096.0),
     ("200mbit", 25e6), ("1kB/s", 1000.0)],
)
def test_byte_rates(text: str, value: float) -> None:
    assert parse_byte_rate(text) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [("300ms", 0.3), ("5s", 5.0), ("1.5s", 1.5), ("60s", 60.0), ("2m", 120.0),
     ("2min", 120.0), ("1h", 3600.0), ("50us", 50e-6), ("50µs", 50e-6), ("10ns", 1e-8),
     ("0.25", 0.25), ("0", 0.0), (0.1, 0.1), ("200 ms", 0.2)],
)
def test_durations(text: str | float, value: float) -> None:
    assert parse_duration(text) == value  # exactly: "300ms" is 0.3, not 0.30000000000000004


@pytest.mark.parametrize(
    ("text", "value"), [("0.1%", 0.001), ("0.001", 0.001), ("100%", 1.0), ("0", 0.0), (0.5, 0.5)]
)
def test_fractions(text: str | float, value: float) -> None:
    assert parse_fraction(text) == value


@pytest.mark.parametrize(
    ("parse", "junk"),
    [(parse_size, "lots"), (parse_size, "4 parsecs"), (parse_size, "-1MiB"), (parse_size, "0"),
     (parse_size, "1e30GiB"), (parse_size, "8EiB"), (parse_size, ""), (parse_size, True),
     (parse_bit_rate, "10mbps"), (parse_bit_rate, "10Mb/s"), (parse_bit_rate, "10MB"),
     (parse_bit_rate, "0"), (parse_bit_rate, "fast"), (parse_bit_rate, "1gbyte"),
     (parse_bit_rate, "nan"), (parse_byte_rate, "20furlongs/s"), (parse_byte_rate, "20mb/s"),
     (parse_byte_rate, "-1MB/s"), (parse_duration, "soon"), (parse_duration, "-5ms"),
     (parse_duration, "ms"), (parse_duration, float("inf")), (parse_duration, "1e99s"),
     (parse_fraction, "101%"), (parse_fraction, "1.5"), (parse_fraction, "5 permille")],
)
def test_junk_is_a_config_error_saying_what_was_given_and_what_is_accepted(
        parse: Callable[[Any], object], junk: Any) -> None:
    with pytest.raises(ConfigError) as info:
        parse(junk)
    message = str(info.value)
    assert repr(junk) in message
    assert "e.g." in message or "at least" in message or "between" in message \
        or "too large" in message or "negative" in message or "finite" in message \
        or "ambiguous" in message or "size, not a rate" in message


def test_the_demo_reads_its_dirty_rate_as_its_help_prints_it(
        capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(["demo", "--dirty-rate", "20MB/s", "--disk-rate", "2MB/s"])
    assert (args.dirty_rate, args.disk_rate) == (20e6, 2e6)
    defaults = parser.parse_args(["demo"])
    assert (defaults.dirty_rate, defaults.rate, defaults.ram) == (60e6, 200_000_000, 256 * MiB)
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--help"])
    assert "(default 60MB/s)" in " ".join(capsys.readouterr().out.split())


# -- every help default and every README example --------------------------------------------


def subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
               ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """``parser`` and every subcommand's parser under it, with their command words."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subparsers(sub, (*path, name))


def unit_options(parser: argparse.ArgumentParser) -> dict[str, Callable[[str], Any]]:
    """Each option of ``parser`` read by :mod:`xmig.units`, by each of its flags."""
    out: dict[str, Callable[[str], Any]] = {}
    for action in parser._actions:
        convert = action.type
        if callable(convert) and getattr(convert, "units_parser", None) is not None:
            out.update({flag: convert for flag in action.option_strings})
    return out


def test_every_size_rate_and_duration_option_parses_its_default_as_its_help_says() -> None:
    checked = set()
    for path, parser in subparsers(build_parser()):
        for action in parser._actions:
            convert = action.type
            if getattr(convert, "units_parser", None) is None or convert is None:
                continue
            assert callable(convert)
            flag = " ".join((*path, action.option_strings[0]))
            if isinstance(action.default, str):
                value = convert(action.default)
                checked.add(flag)
                for shown in shown_defaults(parser, action):
                    assert convert(shown) == value, flag
    # the options the issue names, at least
    for flag in ("demo --dirty-rate", "demo --disk-rate", "demo --ram", "demo --rate",
                 "demo --rtt", "demo --loss", "demo --max-downtime", "guest start --ram",
                 "guest start --rate", "guest start --disk-rate", "migrate --max-downtime",
                 "migrate --timeout"):
        assert flag in checked, flag
    agent = dict(subparsers(build_parser()))[("agent",)]
    assert {"--max-ram", "--max-disk"} <= set(unit_options(agent))


def shown_defaults(parser: argparse.ArgumentParser, action: argparse.Action) -> list[str]:
    """The values ``action``'s help prints as its default (``default 60MB/s``, ``default:
    2GiB``, ``default 1GiB, quick 256MiB``), as ``--help`` shows them."""
    if not action.help:
        return []
    text = " ".join(parser._get_formatter()._expand_help(action).split())
    return re.findall(r"default:? ([0-9][^\s),;:]*)", text)


def test_every_help_text_prints_defaults_that_parse() -> None:
    shown = 0
    for _path, parser in subparsers(build_parser()):
        options = unit_options(parser)
        for action in parser._actions:
            convert = options.get(action.option_strings[0]) if action.option_strings else None
            if convert is None:
                continue
            for value in shown_defaults(parser, action):
                convert(value)  # raises argparse.ArgumentTypeError or ConfigError if not
                shown += 1
    assert shown >= 15


def readme_commands() -> Iterator[list[str]]:
    """Each ``xmig ...`` command line of the README's code blocks, continuation lines
    joined, as words (placeholders and brackets dropped)."""
    lines = [line.strip() for line in README.read_text().splitlines()
             if line.startswith("    ")]
    joined: list[str] = []
    for line in lines:
        if joined and joined[-1].endswith("\\"):
            joined[-1] = joined[-1][:-1] + " " + line
        else:
            joined.append(line)
    for line in joined:
        for part in re.split(r"[;&]|\s#", line):
            words = shlex.split(part.replace("[", " ").replace("]", " "), comments=True)
            if "xmig" in words:
                yield words[words.index("xmig") + 1:]


def test_every_readme_example_parses() -> None:
    parsers = dict(subparsers(build_parser()))
    seen = 0
    for words in readme_commands():
        path: tuple[str, ...] = ()
        while words and (*path, words[0]) in parsers:
            path, words = (*path, words[0]), words[1:]
        options = unit_options(parsers[path])
        for flag, value in itertools.pairwise(words):
            if flag in options:
                options[flag](value)
                seen += 1
    assert seen >= 8  # --ram 1GiB, --disk 4GiB, --rate 1gbit, --rtt 200ms, --loss 0.1%, ...
    prose = re.findall(r"\b\d+(?:\.\d+)? ?(?:[KMG]iB|MB/s|Mbit/s|ms)\b", README.read_text())
    assert prose
    for quantity in prose:
        unit = quantity.lstrip("0123456789. ")
        parse = {"MB/s": parse_byte_rate, "Mbit/s": parse_bit_rate, "ms": parse_duration}.get(
            unit, parse_size)
        parse(quantity)


# -- formatting a value, then parsing it, gives it back ----------------------------------


@given(st.integers(min_value=1, max_value=2**62))
def test_sizes_round_trip(value: int) -> None:
    assert parse_size(format_size(value)) == value


@given(st.sampled_from([KiB, MiB, GiB, 10**3, 10**6, 10**9]), st.integers(1, 4096))
def test_round_sizes_are_written_in_their_unit(unit: int, count: int) -> None:
    text = format_size(unit * count)
    assert parse_size(text) == unit * count and not text.isdigit()


@given(st.integers(min_value=1, max_value=10**15))
def test_bit_rates_round_trip(value: int) -> None:
    assert parse_bit_rate(format_bit_rate(value)) == value


@given(st.one_of(st.integers(0, 10**12).map(float),
                 st.floats(min_value=0, max_value=1e12, allow_nan=False)))
def test_byte_rates_round_trip(value: float) -> None:
    assert parse_byte_rate(format_byte_rate(value)) == value


@given(st.floats(min_value=0, max_value=1e9, allow_nan=False))
def test_durations_round_trip(value: float) -> None:
    assert parse_duration(format_duration(value)) == value


@given(st.floats(min_value=0, max_value=1, allow_nan=False))
def test_fractions_round_trip(value: float) -> None:
    assert parse_fraction(format_fraction(value)) == value


def test_formats_read_as_an_operator_writes_them() -> None:
    assert (format_size(256 * MiB), format_size(10**9), format_size(4097)) == \
        ("256MiB", "1GB", "4097")
    assert (format_bit_rate(200_000_000), format_bit_rate(1234)) == ("200mbit", "1234bit")
    assert (format_byte_rate(60e6), format_byte_rate(MiB)) == ("60MB/s", "1MiB/s")
    assert (format_duration(0.3), format_duration(1.5), format_duration(5e-5)) == \
        ("300ms", "1.5s", "50us")
    assert format_fraction(0.001) == "0.1%"
