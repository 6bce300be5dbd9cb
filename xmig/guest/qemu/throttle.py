"""SDPS for a QEMU guest: its vCPU threads' CPU quota (cgroup v1 ``cpu`` controller).

:class:`CgroupThrottle` moves the vCPU threads (``query-cpus-fast``) into a cgroup of their own
and sets ``cpu.cfs_quota_us`` to ``(1 − throttle) × period × vCPUs``: guest progress falls in
proportion (measured here: 100 % → 18.4 k/s, 50 % → 9.2 k/s, 10 % → 1.75 k/s), while QEMU's
other threads (the migration thread, QMP, I/O) keep full speed. The period is 100 ms; a
throttle past 99 % (whose quota would be under the kernel's 1 ms floor) lengthens it, up to
the kernel's 1 s, so the strongest throttle is 99.9 % (:data:`MAX_THROTTLE`). A fixed 100 ms
period stopped at 99 %, and 1 % of a 1.3–2 GB/s writer of whole pages is 13–20 MB/s: at or
past what a 200 Mbit/s link carries, so that guest converged or not by chance.
:class:`QemuSdps` feeds the reference guest's controller
(:class:`~xmig.memory.sdps.ProportionalThrottle`) with the guest's dirty rate and the
session's delivery rate. Released at switchover and on abort (threads back in the root
group, the group removed).

The dirty rate comes from QEMU's ``calc-dirty-rate`` (page-sampling mode; its dirty-bitmap
mode crashes QEMU 7.2 under TCG), one measurement of ``calc_time_s`` after another, not from
``query-migrate``'s ``dirty-pages-rate``: that one is computed once per migration pass (none
at all during the first, long one) and counts distinct pages per pass, so a guest rewriting
its working set many times per pass looked slow (2.4 MB/s measured for a writer that outran
a 12.5 MB/s link).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any

from xmig.errors import NotConverging, QemuError, XmigError
from xmig.guest.qemu.machine import QemuGuest
from xmig.memory.sdps import ProportionalThrottle, ThrottleController
from xmig.transport import TransportSession

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000
MIN_QUOTA_US = 1_000  #: the kernel's floor for cfs_quota_us
MAX_PERIOD_US = 1_000_000  #: the kernel's ceiling for cfs_period_us
MAX_THROTTLE = 1.0 - MIN_QUOTA_US / MAX_PERIOD_US  #: 99.9 %
#: the dirty rate SDPS aims at, as a share of the link's (the reference guest's is 0.7):
#: ``calc-dirty-rate`` samples pages and read 4.0 MiB/s where QEMU's pass counted 5.6, and
#: a busy host's link delivered 5 MB/s of 25: at 0.7 pre-copy stalled at 7 MiB to go
QEMU_ALPHA = 0.5


def quota_for(throttle: float, period_us: int = PERIOD_US) -> tuple[int, int]:
    """``(cfs_period_us, cfs_quota_us per vCPU)`` that let a thread run ``1 − throttle`` of
    the time: ``period_us``, lengthened when the quota would fall under the kernel's floor."""
    speed = max(1.0 - min(throttle, MAX_THROTTLE), MIN_QUOTA_US / MAX_PERIOD_US)
    if speed * period_us < MIN_QUOTA_US:
        period_us = min(MAX_PERIOD_US, math.ceil(MIN_QUOTA_US / speed))
    return period_us, max(MIN_QUOTA_US, round(speed * period_us))


def speeds_differ(a: float, b: float) -> bool:
    """Whether throttles ``a`` and ``b`` let the vCPUs run at paces 5 % apart or more (0.997
    and 0.999 are three times apart; 0.100 and 0.104 are not)."""
    fast, slow = max(1.0 - a, 1.0 - b), min(1.0 - a, 1.0 - b)
    return fast - slow > 0.05 * fast


class CgroupThrottle:
    """A cgroup v1 cpu group holding some threads; :meth:`set` throttles them."""

    def __init__(self, name: str, *, root: Path = CGROUP_CPU, period_us: int = PERIOD_US
                 ) -> None:
        self.root = root
        self.path = root / name
        self.period_us = period_us
        self.threads: list[int] = []
        self.throttle = 0.0

    def _write(self, path: Path, value: str) -> None:
        try:
            path.write_text(value)
        except OSError as err:
            raise QemuError(f"cgroup {path}: {err} (cgroup v1 cpu controller, root needed)"
                            ) from err

    def attach(self, threads: list[int]) -> None:
        if not (self.root / "cpu.cfs_quota_us").exists():
            raise QemuError(f"no cgroup v1 cpu controller at {self.root}")
        try:
            self.path.mkdir(exist_ok=True)
        except OSError as err:
            raise QemuError(f"cannot create cgroup {self.path}: {err}") from err
        self._write(self.path / "cpu.cfs_period_us", str(self.period_us))
        for tid in threads:
            self._write(self.path / "tasks", str(tid))
        self.threads = list(threads)

    def set(self, throttle: float) -> None:
        """0.0 = no limit … :data:`MAX_THROTTLE`."""
        self.throttle = throttle
        period, quota = self.period_us, -1
        if throttle > 0:
            period, per_cpu = quota_for(throttle, self.period_us)
            quota = per_cpu * max(1, len(self.threads))
        # the new period first: the old quota is valid with any period
        self._write(self.path / "cpu.cfs_period_us", str(period))
        self._write(self.path / "cpu.cfs_quota_us", str(quota))

    def release(self) -> None:
        """Full speed, threads back in the root group, the group removed (idempotent;
        a thread that has exited is skipped)."""
        if not self.path.exists():
            return
        with contextlib.suppress(QemuError):
            self.set(0.0)
        for tid in self.threads:
            with contextlib.suppress(OSError):
                (self.root / "tasks").write_text(str(tid))
        with contextlib.suppress(OSError):
            os.rmdir(self.path)
        self.throttle = 0.0


class QemuSdps:
    """SDPS for one source QEMU during its migration."""

    def __init__(self, guest: QemuGuest, session: TransportSession, *,
                 controller: ThrottleController | None = None, period_s: float = 0.25,
                 calc_time_s: int = 1, cfs_period_us: int = PERIOD_US) -> None:
        self.guest = guest
        self.session = session
        self.controller = controller or ProportionalThrottle(
            alpha=QEMU_ALPHA, window=float(calc_time_s), max_throttle=MAX_THROTTLE)
        self.period_s = period_s
        self.calc_time_s = calc_time_s
        self._measuring = False
        self.cgroup = CgroupThrottle(f"xmig-{guest.config.name}-{os.getpid()}",
                                     period_us=cfs_period_us)
        self.max_throttle = 0.0
        self.samples: list[dict[str, float]] = []

    async def start(self) -> None:
        threads = await self.guest.vcpu_threads()
        await asyncio.to_thread(self.cgroup.attach, threads)

    async def _dirty_rate(self) -> float | None:
        """The last finished measurement in bytes/s (None while one runs); starts the next."""
        rate: float | None = None
        if self._measuring:
            info: Any = await self.guest.execute("query-dirty-rate")
            if info.get("status") == "measuring":
                return None
            self._measuring = False
            if info.get("status") == "measured":
                rate = float(info.get("dirty-rate", 0)) * (1 << 20)  # MiB/s
        await self.guest.execute("calc-dirty-rate", {"calc-time": self.calc_time_s})
        self._measuring = True
        return rate

    async def _pass_dirty_rate(self) -> float:
        """QEMU's own dirty rate of its last pass, bytes/s (0 before one ended): distinct
        pages, so a floor under a sample of the same time. Page sampling read 0 of a
        guest that QEMU's pass saw dirty 2.2 MiB/s at a 99.8 % throttle, and the
        controller, believing it, let go."""
        info: Any = await self.guest.execute("query-migrate")
        ram = info.get("ram") or {}
        return float(ram.get("dirty-pages-rate", 0)) * float(ram.get("page-size", 4096))

    async def step(self) -> float:
        dirty = await self._dirty_rate()
        rate = float(self.session.stats().get("delivery_rate_Bps") or 0.0)
        if dirty is None or rate <= 0:
            return self.cgroup.throttle
        dirty = max(dirty, await self._pass_dirty_rate())
        throttle = self.controller.update(now=time.monotonic(), delivery_rate=rate,
                                          dirty_rate=dirty)
        if speeds_differ(throttle, self.cgroup.throttle):
            await asyncio.to_thread(self.cgroup.set, throttle)
        self.max_throttle = max(self.max_throttle, throttle)
        self.samples.append({"dirty_Bps": dirty, "rate_Bps": rate, "throttle": throttle})
        return throttle

    async def run(self) -> None:
        """Until cancelled, or until the controller says the guest cannot converge (its
        NotConverging ends the pre-copy: :meth:`QemuSource.converge` watches this task)."""
        while True:
            try:
                await self.step()
            except NotConverging:
                raise
            except XmigError:
                pass  # a missed sample is not fatal
            await asyncio.sleep(self.period_s)  # a control period, not a wait for a condition

    def release(self) -> None:
        self.controller.release()
        self.cgroup.release()
