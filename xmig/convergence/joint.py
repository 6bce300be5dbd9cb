"""The convergence controller as the page engine's throttle controller.

:class:`JointThrottle` is a :class:`~xmig.memory.sdps.base.ThrottleController` the page
engine (:class:`~xmig.memory.engine.MemorySender`) updates every interval from the start of
the pre-copy. Each update it reads the disk mirror's figures and the whole session's link
(the engine hands it memory's share only), asks the
:class:`~xmig.convergence.controller.ConvergenceController`, hands the disk pace to the
mirror and returns the vCPU throttle. A NOT_CONVERGING verdict ends the pre-copy at once
(:class:`~xmig.errors.NotConverging`, with the controller's reason), not at ``--timeout``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from xmig.convergence.controller import (
    Control,
    ControllerConfig,
    ConvergenceController,
    Sample,
    Verdict,
)
from xmig.errors import NotConverging
from xmig.memory.sdps.base import ThrottleController
from xmig.storage.engine import DiskSender
from xmig.transport import TransportSession

#: a session with this much more than one bandwidth-delay product unsent or unacknowledged
#: is busy: its delivery rate is the link's
BUSY_SLACK_BYTES = 64 * 1024


@dataclass(frozen=True)
class DiskFigures:
    """The disk mirror, as the controller needs it."""

    mirrored_bytes: int  #: guest-write bytes mirrored so far (a running total)
    queue_bytes: int  #: queued and held: what a drain must move
    held_bytes: int  #: writes waiting for their acknowledgement now
    bulk_left_bytes: int


@dataclass(frozen=True)
class LinkFigures:
    delivery_rate: float  #: wire bytes/s the whole session delivers while busy (else 0)
    rtt: float  #: smoothed
    base_rtt: float = 0.0  #: the least seen


class JointThrottle(ThrottleController):
    """Both of the guest's rates from one controller (issue 10)."""

    name = "convergence"
    always_updated = True

    def __init__(self, config: ControllerConfig, *, start: float,
                 disk: Callable[[], DiskFigures], link: Callable[[], LinkFigures],
                 set_pace: Callable[[float | None], None]) -> None:
        super().__init__(max_throttle=config.max_throttle)
        self.controller = ConvergenceController(config, start=start)
        self._disk, self._link, self._set_pace = disk, link, set_pace
        self._last: tuple[float, int] | None = None  #: (now, mirrored bytes)
        self.last: Control | None = None
        self.max_pace_slowdown = 0.0  #: the strongest disk slowdown, 1 − pace ÷ disk rate

    def update(self, *, now: float, delivery_rate: float, dirty_rate: float,
               memory_share: float = 1.0, wire_ratio: float = 1.0) -> float:
        disk, link = self._disk(), self._link()
        rate: float | None = None  # not known before two figures
        if self._last is not None and now > self._last[0]:
            rate = (disk.mirrored_bytes - self._last[1]) / (now - self._last[0])
        self._last = (now, disk.mirrored_bytes)
        control = self.controller.update(Sample(
            now=now, delivery_rate=link.delivery_rate, rtt=link.rtt,
            base_rtt=link.base_rtt, dirty_rate=dirty_rate,
            wire_ratio=wire_ratio, disk_write_rate=rate, mirror_queue_bytes=disk.queue_bytes,
            mirror_held_bytes=disk.held_bytes,
            bulk_left_bytes=disk.bulk_left_bytes))
        self.last = control
        self._set_pace(control.disk_pace_Bps)
        if control.disk_pace_Bps is not None and control.disk_base_Bps > 0:
            self.max_pace_slowdown = max(self.max_pace_slowdown,
                                         1 - control.disk_pace_Bps / control.disk_base_Bps)
        if control.verdict is Verdict.NOT_CONVERGING:
            raise NotConverging(control.reason)
        return self._set(control.throttle)

    def engage(self, reason: str) -> None:
        super().engage(reason)
        self.controller.engage(reason)

    def release(self) -> float:
        self.controller.release()
        self._set_pace(None)
        return super().release()


def for_session(config: ControllerConfig, session: TransportSession,
                sender: DiskSender | None) -> JointThrottle:
    """The controller of a migration on ``session`` whose disk (if any) ``sender`` mirrors:
    the whole session's delivery rate and RTTs, the mirror's figures and pace."""

    def disk() -> DiskFigures:
        if sender is None:
            return DiskFigures(mirrored_bytes=0, queue_bytes=0, held_bytes=0,
                               bulk_left_bytes=0)
        p = sender.progress()
        return DiskFigures(mirrored_bytes=p.mirror_bytes, queue_bytes=p.pending_bytes,
                           held_bytes=p.mirror_held_bytes,
                           bulk_left_bytes=p.size - p.bulk_applied)

    def link() -> LinkFigures:
        st = session.stats()
        rate = float(st.get("delivery_rate_Bps") or 0.0)
        rtt = float(st.get("srtt_s") or st.get("min_rtt_s") or 0.0)
        channels = session.session.send_channels.values()
        backlog = sum(c.inflight_bytes + c.pending_bytes for c in channels)
        # more than the pipe holds waits to be sent: the rate measured is the link's
        busy = backlog > rate * rtt + BUSY_SLACK_BYTES
        return LinkFigures(rate if busy else 0.0, rtt, float(st.get("min_rtt_s") or 0.0))

    return JointThrottle(config, start=time.monotonic(), disk=disk, link=link,
                         set_pace=sender.set_pace if sender else lambda rate: None)
