"""Fidelity of the TUN emulator: measured RTT and rate against the configured ones (5 %).

RTT: median of 12 TCP_NODELAY one-byte ping-pongs on one connection (after 2 warm-ups).
Rate: one cubic TCP stream src -> dst at 20 ms RTT; goodput is counted at the receiver over
2 s once 1 s has passed (slow start is over by then), and compared as goodput x 1500/1448,
the IP bytes of the full-size segments that carried it (20 IP + 32 TCP-with-timestamps header
bytes per 1448 payload bytes). The IP bytes the emulator itself counted are checked too.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.netem.helpers import bulk_goodput, median_rtt
from xmig.netem import LinkSpec, Wan

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.mark.parametrize("rtt_s", [0.050, 0.200])
def test_rtt_within_5_percent(rtt_s: float, record_property: Callable[[str, object], None]) -> None:
    with Wan(LinkSpec.symmetric(rate_bps=1_000_000_000, rtt_s=rtt_s), fallback="tun") as wan:
        measured = median_rtt(wan, count=12)
    record_property("rtt_ms", measured * 1e3)
    print(f"\nconfigured RTT {rtt_s * 1e3:.0f} ms, measured median {measured * 1e3:.2f} ms")
    assert measured == pytest.approx(rtt_s, rel=0.05)


@pytest.mark.parametrize("rate_bps", [100_000_000, 1_000_000_000])
def test_rate_within_5_percent(
    rate_bps: int, record_property: Callable[[str, object], None]
) -> None:
    with Wan(LinkSpec.symmetric(rate_bps=rate_bps, rtt_s=0.020), fallback="tun") as wan:
        result = bulk_goodput(wan, warmup_s=1.0, window_s=2.0, cc="cubic")
    record_property("wire_estimate_mbit", result.wire_estimate_bps / 1e6)
    print(
        f"\nconfigured {rate_bps / 1e6:.0f} Mbit/s: goodput {result.goodput_bps / 1e6:.1f}, "
        f"x1500/1448 = {result.wire_estimate_bps / 1e6:.1f}, emulator counted "
        f"{result.counted_wire_bps / 1e6:.1f} Mbit/s of IP bytes; emulator CPU "
        f"{result.emulator_cpu():.2f} core ({result.emulator_cpu('cpu_user_s'):.2f} user)"
    )
    assert result.wire_estimate_bps == pytest.approx(rate_bps, rel=0.05)
    assert result.counted_wire_bps == pytest.approx(rate_bps, rel=0.05)
