"""A forecast before a migration starts (``xmig migrate --plan``): measure, then predict.

:func:`make_plan` measures the guest first (its backend says how: the reference guest's
counters and a sample of its memory and disk, :func:`sim_guest_rates`; QEMU's shared RAM
file sampled twice and its block statistics, :mod:`xmig.guest.qemu.plan`), then the link to
the agent (:func:`~xmig.orchestrator.probe.probe_link`, one after the other so the probe's
traffic does not slow the guest it measures), and runs the convergence controller's model on both
(:func:`~xmig.convergence.forecast.forecast`). Nothing is migrated and nothing changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from xmig.convergence import ControllerConfig
from xmig.convergence.forecast import Forecast, GuestRates, forecast
from xmig.convergence.sample import first_pass
from xmig.guest.sim import Progress, SimGuest
from xmig.orchestrator.probe import LinkSample, probe_link
from xmig.storage.raw import RawFileBackend
from xmig.transport.driver import TransportSession


@dataclass(frozen=True)
class Plan:
    """The forecast, and the link probe it was made from."""

    forecast: Forecast
    link: LinkSample

    def to_json(self) -> dict[str, Any]:
        return {**self.forecast.to_json(), "link_probe": self.link.to_json()}


async def make_plan(guest: Awaitable[GuestRates], session: TransportSession, *,
                    seconds: float, config: ControllerConfig,
                    rate_cap_Bps: float | None = None) -> Plan:
    """Measure the guest (awaiting ``guest``), then the link under ``session`` for
    ``seconds``; forecast a migration under ``config`` (capped at ``rate_cap_Bps``)."""
    rates = await guest
    link = await probe_link(session, seconds)
    rate = link.rate_Bps if rate_cap_Bps is None else min(link.rate_Bps, rate_cap_Bps)
    return Plan(forecast(config, rates, rate_Bps=rate, rtt_s=link.rtt_s), link)


async def sim_guest_rates(guest: SimGuest, disk: RawFileBackend | None, *, seconds: float,
                          seed: int = 0) -> GuestRates:
    """A reference guest's rates over ``seconds`` (memory it dirties, bytes it writes to its
    disk) and its first pass's wire size (a seeded sample of its memory and disk)."""
    a = guest.progress()
    t0 = asyncio.get_running_loop().time()
    await asyncio.sleep(seconds)  # the measurement window
    b = guest.progress()
    dt = asyncio.get_running_loop().time() - t0
    return await asyncio.to_thread(sim_rates_of, guest, disk, a, b, dt, seed=seed)


def sim_rates_of(guest: SimGuest, disk: RawFileBackend | None, before: Progress,
                 after: Progress, seconds: float, *, seed: int = 0) -> GuestRates:
    """A reference guest's rates between two of its progress snapshots ``seconds`` apart,
    and its first pass's wire size (reads a sample of its memory and disk: call it in a
    thread)."""
    one_time = first_pass(guest.memory, disk, seed=seed)
    cfg = guest.config
    return GuestRates(
        ram_bytes=cfg.ram_bytes, disk_bytes=one_time.disk_wire_bytes,
        dirty_Bps=after.dirty_rate_Bps,
        disk_write_Bps=(after.disk_write_bytes - before.disk_write_bytes) / max(seconds, 1e-9),
        hot_bytes=cfg.hotset_bytes if cfg.workload in ("hotset", "oltp") else None,
        wire_ratio=one_time.written_wire_ratio, first_pass_ratio=one_time.memory_wire_ratio)
