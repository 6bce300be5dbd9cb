"""WAN link emulation for tests, drills and benchmarks: rate, delay, loss, queue, cuts.

Library (see :mod:`xmig.netem.link` for an example)::

    from xmig.netem import LinkSpec, Wan, parse_rate, parse_duration
    with Wan(LinkSpec.symmetric(rate_bps=parse_rate("1gbit"), rtt_s=parse_duration("100ms"))) as w:
        ...  # w.socket("src"/"dst"), w.dst_endpoint(port), w.popen(...), w.cut(), w.stats()

Operator CLI (:mod:`xmig.netem.cli`)::

    xmig netem up --rate 1gbit --rtt 200ms --loss 0.1% --name wan1   # foreground
    ip netns exec wan1-dst iperf3 -s &  ip netns exec wan1-src iperf3 -c 10.231.2.2
    xmig netem cut --name wan1; xmig netem restore --name wan1; xmig netem stats --name wan1

Modules: :mod:`~xmig.netem.link` (Wan, wan), :mod:`~xmig.netem.spec` (LinkSpec, parsers),
:mod:`~xmig.netem.scheduler` (the sans-IO packet scheduler), :mod:`~xmig.netem.emulator` (the
TUN emulator process),
:mod:`~xmig.netem.topology` and :mod:`~xmig.netem.nsutil` (namespaces, pyroute2),
:mod:`~xmig.netem.tunlink` (faithful link), :mod:`~xmig.netem.relay` (no-root fallback).
"""

from xmig.netem.link import Wan, tun_available, wan
from xmig.netem.spec import LinkSpec, parse_duration, parse_fraction, parse_rate, parse_size

__all__ = [
    "LinkSpec",
    "Wan",
    "parse_duration",
    "parse_fraction",
    "parse_rate",
    "parse_size",
    "tun_available",
    "wan",
]
