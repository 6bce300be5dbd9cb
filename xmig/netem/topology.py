"""The three-namespace topology of the TUN emulator, configured with pyroute2.

::

    src ns                     mid ns                                   dst ns
    wan0 10.231.1.2/24 ── v-src 10.231.1.1   v-dst 10.231.2.1 ── wan0 10.231.2.2/24
                          │ iif v-src → table 101: 10.231.2.0/24 dev tun-fwd
                          │ iif v-dst → table 102: 10.231.1.0/24 dev tun-rev
                          └ the emulator reads tun-fwd/tun-rev and writes each packet, when
                            due, into the other TUN; it re-enters mid and leaves by the main
                            table (ip_forward=1, rp_filter off)

All links have MTU 1500. The addresses are the same for every link: each link lives in its
own namespaces, so links never collide with each other or with the host. Interfaces are made
inside the namespaces (veth peers are created directly in their target namespace), so nothing
ever appears in the host's namespace.

Every function here runs inside a :class:`~xmig.netem.nsutil.NetnsThread` of the namespace it
configures; this module imports pyroute2, which the emulator process does not need.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pyroute2 import IPRoute

from xmig.errors import NetemError
from xmig.netem.nsutil import read_sysctl, write_sysctl

MTU = 1500
#: Socket buffer autotuning maxima for src and dst: one TCP stream can fill 1 Gbit/s x 200 ms.
TCP_MEM_MAX = 64 * 1024 * 1024
TABLE_FWD = 101
TABLE_REV = 102


@dataclass(frozen=True)
class Addressing:
    """Addresses and interface names of one link."""

    src_addr: str = "10.231.1.2"
    dst_addr: str = "10.231.2.2"
    mid_src_addr: str = "10.231.1.1"
    mid_dst_addr: str = "10.231.2.1"
    src_net: str = "10.231.1.0"
    dst_net: str = "10.231.2.0"
    prefix: int = 24
    host_if: str = "wan0"
    mid_src_if: str = "v-src"
    mid_dst_if: str = "v-dst"
    tun_fwd: str = "tun-fwd"
    tun_rev: str = "tun-rev"


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetemError(f"interface {ifname} not found")
    return int(found[0])


def setup_mid_links(a: Addressing, src_fd: int, dst_fd: int) -> None:
    """In mid: forwarding on, rp_filter off, the two veth pairs (peers go to src and dst)."""
    write_sysctl("net.ipv4.ip_forward", "1")
    write_sysctl("net.ipv4.conf.all.rp_filter", "0")
    write_sysctl("net.ipv4.conf.default.rp_filter", "0")
    if os.path.exists("/proc/sys/net/ipv6"):  # keep IPv6 chatter (MLD, RS) off the TUNs
        write_sysctl("net.ipv6.conf.default.disable_ipv6", "1")
        write_sysctl("net.ipv6.conf.all.disable_ipv6", "1")
    try:
        with IPRoute() as ipr:
            ipr.link("set", index=_index(ipr, "lo"), state="up")
            for ifname, peer_fd, addr in (
                (a.mid_src_if, src_fd, a.mid_src_addr),
                (a.mid_dst_if, dst_fd, a.mid_dst_addr),
            ):
                ipr.link(
                    "add",
                    ifname=ifname,
                    kind="veth",
                    peer={"ifname": a.host_if, "net_ns_fd": peer_fd},
                )
                idx = _index(ipr, ifname)
                ipr.link("set", index=idx, mtu=MTU)
                ipr.addr("add", index=idx, address=addr, prefixlen=a.prefix)
                ipr.link("set", index=idx, state="up")
    except OSError as err:  # pyroute2's NetlinkError is an OSError
        raise NetemError(f"cannot build the middle namespace: {err}") from err


def setup_host(a: Addressing, side: str) -> None:
    """In src or dst: loopback up, wan0 addressed and up, default route via mid, TCP buffers."""
    addr, gateway = (a.src_addr, a.mid_src_addr) if side == "src" else (a.dst_addr, a.mid_dst_addr)
    for key in ("net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"):
        low, default, _ = (int(x) for x in read_sysctl(key).split())
        write_sysctl(key, f"{low} {default} {TCP_MEM_MAX}")
    try:
        with IPRoute() as ipr:
            ipr.link("set", index=_index(ipr, "lo"), state="up")
            idx = _index(ipr, a.host_if)
            ipr.link("set", index=idx, mtu=MTU)
            ipr.addr("add", index=idx, address=addr, prefixlen=a.prefix)
            ipr.link("set", index=idx, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=gateway)
    except OSError as err:
        raise NetemError(f"cannot configure the {side} namespace: {err}") from err


def setup_mid_routing(a: Addressing) -> None:
    """In mid, once the emulator opened its TUNs: TUNs up, per-direction policy routing."""
    try:
        with IPRoute() as ipr:
            for tun in (a.tun_fwd, a.tun_rev):
                idx = _index(ipr, tun)
                ipr.link("set", index=idx, mtu=MTU, state="up")
            for ifname in (a.mid_src_if, a.mid_dst_if, a.tun_fwd, a.tun_rev):
                write_sysctl(f"net.ipv4.conf.{ifname}.rp_filter", "0")
            for iif, net, tun, table in (
                (a.mid_src_if, a.dst_net, a.tun_fwd, TABLE_FWD),
                (a.mid_dst_if, a.src_net, a.tun_rev, TABLE_REV),
            ):
                ipr.route("add", dst=f"{net}/{a.prefix}", oif=_index(ipr, tun), table=table)
                ipr.rule("add", iifname=iif, table=table, priority=1000 + table)
    except OSError as err:
        raise NetemError(f"cannot set up routing through the emulator: {err}") from err
