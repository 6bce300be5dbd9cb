"""Parsers and LinkSpec validation."""

from __future__ import annotations

import pytest

from xmig.errors import ConfigError
from xmig.netem import LinkSpec, parse_duration, parse_fraction, parse_rate, parse_size
from xmig.netem.spec import format_rate


@pytest.mark.parametrize(
    ("text", "bps"),
    [
        ("1gbit", 1_000_000_000),
        ("100mbit", 100_000_000),
        ("500kbit", 500_000),
        ("1e9", 1_000_000_000),
        ("1.5Mbit", 1_500_000),
        ("2.5gbit/s", 2_500_000_000),
        ("64000", 64_000),
        (10_000, 10_000),
    ],
)
def test_parse_rate(text: str | int, bps: int) -> None:
    assert parse_rate(text) == bps


@pytest.mark.parametrize("junk", ["", "fast", "10mbps", "-1gbit", "0", "1gbyte", "nan", True, 0])
def test_parse_rate_junk(junk: str | int) -> None:
    with pytest.raises(ConfigError):
        parse_rate(junk)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("200ms", 0.2), ("1.5s", 1.5), ("50us", 50e-6), ("0.25", 0.25), (0.1, 0.1), ("0", 0.0)],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("junk", ["", "200 furlongs", "-5ms", "ms", float("inf")])
def test_parse_duration_junk(junk: str | float) -> None:
    with pytest.raises(ConfigError):
        parse_duration(junk)


@pytest.mark.parametrize(
    ("text", "fraction"), [("0.1%", 0.001), ("0.001", 0.001), ("100%", 1.0), (0.5, 0.5), ("0", 0.0)]
)
def test_parse_fraction(text: str | float, fraction: float) -> None:
    assert parse_fraction(text) == pytest.approx(fraction)


@pytest.mark.parametrize("junk", ["101%", "1.5", "-0.1", "ten", "5 permille"])
def test_parse_fraction_junk(junk: str) -> None:
    with pytest.raises(ConfigError):
        parse_fraction(junk)


def test_parse_size() -> None:
    assert parse_size("262144") == 262144
    assert parse_size("256KiB") == 262144
    assert parse_size("4MB") == 4_000_000
    with pytest.raises(ConfigError):
        parse_size("4 parsecs")


def test_symmetric_splits_rtt() -> None:
    spec = LinkSpec.symmetric(rate_bps=10**9, rtt_s=0.2, loss=0.01, seed=7)
    assert (spec.delay_fwd_s, spec.delay_rev_s, spec.rtt_s) == (0.1, 0.1, 0.2)
    assert (spec.loss, spec.seed) == (0.01, 7)


def test_default_queue_is_one_bdp_at_least_256k() -> None:
    assert LinkSpec.symmetric(rate_bps=10**9, rtt_s=0.2).effective_queue_bytes() == 25_000_000
    assert LinkSpec.symmetric(rate_bps=10**6, rtt_s=0.01).effective_queue_bytes() == 262144
    assert (
        LinkSpec.symmetric(rate_bps=10**6, rtt_s=0.01, queue_bytes=5000).effective_queue_bytes()
        == 5000
    )
    assert LinkSpec.symmetric(rate_bps=None, rtt_s=0.01).effective_queue_bytes() is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate_bps": 0, "delay_fwd_s": 0, "delay_rev_s": 0},
        {"rate_bps": 1.5, "delay_fwd_s": 0, "delay_rev_s": 0},
        {"rate_bps": None, "delay_fwd_s": -1, "delay_rev_s": 0},
        {"rate_bps": None, "delay_fwd_s": 0, "delay_rev_s": float("nan")},
        {"rate_bps": None, "delay_fwd_s": 0, "delay_rev_s": 0, "loss": 2},
        {"rate_bps": None, "delay_fwd_s": 0, "delay_rev_s": 0, "queue_bytes": 0},
    ],
)
def test_linkspec_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        LinkSpec(**kwargs)  # type: ignore[arg-type]


def test_linkspec_round_trips_through_dict() -> None:
    spec = LinkSpec(10**8, 0.01, 0.03, 0.001, 100_000, 3)
    assert LinkSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError):
        LinkSpec.from_dict({"rate": 5})


def test_describe_and_format() -> None:
    assert format_rate(10**9) == "1gbit"
    assert format_rate(None) == "unshaped"
    assert "rtt 200ms" in LinkSpec.symmetric(rate_bps=10**9, rtt_s=0.2).describe()


def test_the_emulator_reads_units_with_xmigs_one_parser() -> None:
    from xmig import units

    assert parse_rate is units.parse_bit_rate and parse_size is units.parse_size
    assert parse_duration is units.parse_duration and parse_fraction is units.parse_fraction
    spec = LinkSpec.symmetric(rate_bps=parse_rate("1gbit"), rtt_s=parse_duration("200ms"),
                              loss=parse_fraction("0.1%"), queue_bytes=parse_size("4MiB"))
    assert spec.describe() == "rate 1gbit, rtt 200ms, loss 0.1%, queue 4MiB"  # reads back
