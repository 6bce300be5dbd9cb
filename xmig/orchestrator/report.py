"""The final report of one migration (issue 3's keys), from what the source side measured:
one type, :class:`Report`, for every backend and every producer (the local harness, the
source host, the QEMU source process); ``Report.to_json()`` is what ``--json`` and
``--report`` print.

:func:`source_report` builds it from a :class:`~xmig.guest.sim.source.SimSourceResult` and a few
measures the caller takes around the migration; :func:`aborted_report` for one that ended
before GO; the helpers compute the measures, the downtime by one definition
(:func:`downtime_estimate`). Definitions as in DESIGN.md "Measures". Keys:

``status, downtime_ms, client_downtime_ms, total_s, workload_penalty, wire_bytes,
guest_bytes, wire_ratio, link_utilization, sdps_max_throttle, rounds, verified,
acknowledged_writes, lost_acknowledged_writes`` (:data:`REPORT_KEYS`), then details
(``digests``, ``options``, ``timeline``, and whatever the caller adds).

A value the caller could not measure is ``None``: ``client_downtime_ms`` when no client
probed the guest's service during the migration (a source host alone has no client);
``link_utilization`` (bytes sent ÷ link capacity while bulk data — the disk's bulk copy or
memory's round 0 — was pending, :func:`bulk_utilization`) when the link's rate is unknown;
``workload_penalty`` without a progress rate from before the migration; ``verified`` when
verification was off.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmig.convergence.forecast import Forecast
from xmig.errors import MigrationAborted
from xmig.events import Event, SimProgress
from xmig.guest.qemu.migrate import QemuSourceResult
from xmig.guest.sim import LedgerCheck, read_ledger, verify_ledger
from xmig.guest.sim.source import SimSourceResult
from xmig.storage.raw import RawFileBackend

REPORT_KEYS = (
    "status", "downtime_ms", "client_downtime_ms", "total_s", "workload_penalty",
    "wire_bytes", "guest_bytes", "wire_ratio", "link_utilization", "sdps_max_throttle",
    "rounds", "verified", "acknowledged_writes", "lost_acknowledged_writes",
)


@dataclass
class Report:
    """One migration's report: the forecast made before it started (when there was one),
    issue 3's keys (:data:`REPORT_KEYS`; None when not measured), the backend, the error,
    what its producer adds (``details``: digests, options, the backend's own figures), then
    the timeline (JSON events)."""

    status: str  #: done, in-doubt or aborted
    backend: str  #: sim or qemu
    downtime_ms: float | None = None
    downtime_basis: str | None = None  #: how downtime_ms was obtained (downtime_estimate)
    client_downtime_ms: float | None = None
    total_s: float | None = None
    workload_penalty: float | None = None
    wire_bytes: int | None = None
    guest_bytes: int | None = None
    wire_ratio: float | None = None
    link_utilization: float | None = None
    sdps_max_throttle: float | None = None
    rounds: int | None = None
    verified: bool | None = None
    acknowledged_writes: int | None = None
    lost_acknowledged_writes: int | None = None
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    forecast: Forecast | None = None  #: what the model predicted before the start

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.forecast is None else {
            "forecast": self.forecast.to_json()}
        out.update({key: getattr(self, key) for key in REPORT_KEYS})
        out["backend"] = self.backend
        if self.downtime_basis is not None:
            out["downtime_basis"] = self.downtime_basis
        out["error"] = self.error
        out.update(self.details)
        out["timeline"] = self.timeline
        return out

    def set_downtime(self, downtime_s: float | None, basis: str | None = None) -> None:
        self.downtime_ms = None if downtime_s is None else round(downtime_s * 1000, 1)
        self.downtime_basis = basis

    def set_wire(self, wire: Mapping[str, Any], guest_bytes: int) -> None:
        """Bytes on the wire both ways (a session's ``stats()``) over the guest's size."""
        self.wire_bytes = int(wire.get("wire_bytes_out", 0)) + int(wire.get("wire_bytes_in", 0))
        self.guest_bytes = guest_bytes
        self.wire_ratio = round(self.wire_bytes / guest_bytes, 4) if guest_bytes else None


def ledger_check(ledger: Path, disk: RawFileBackend) -> LedgerCheck:
    """Every write acknowledged to the guest (its ledger) checked against ``disk``: with the
    guest paused, a lost one is a broken I2 on this side already."""
    if not ledger.exists():
        return LedgerCheck()
    return verify_ledger(read_ledger(ledger), disk.pread)


def digests_equal(src: SimSourceResult, verify: bool) -> bool | None:
    """True when the destination's memory, device and disk digests at READY equal the
    source's (I5, and I2 with the ledger); None when verification was off."""
    if not verify:
        return None
    return (bool(src.memory_digest)
            and src.ready_digests.get("memory") == src.memory_digest
            and src.ready_digests.get("device") == src.device_digest
            and src.ready_digests.get("disk") == src.disk_digest)


def downtime_estimate(*, last_progress: float, paused_at: float, peer_resumed_at: float,
                      resumed_seen_at: float, srtt_s: float | None
                      ) -> tuple[float | None, str]:
    """The guest's downtime seen from the source: from its last progress before the pause
    to the destination's resume, and how it was obtained.

    ``peer_resumed_at`` is the destination's monotonic clock in RESUMED; when it falls
    between the pause and RESUMED's arrival (``resumed_seen_at``), both sides share one
    clock (one machine) and it is used as is ("destination clock"). Otherwise the resume
    is placed half a smoothed RTT before RESUMED arrived ("estimate"). None without
    RESUMED."""
    if peer_resumed_at <= 0 or resumed_seen_at <= 0:
        return None, "no RESUMED from the destination"
    if paused_at <= peer_resumed_at <= resumed_seen_at:
        return max(peer_resumed_at - last_progress, 0.0), "destination clock"
    resumed = resumed_seen_at - (srtt_s or 0.0) / 2
    return max(resumed - last_progress, 0.0), "estimate: RESUMED arrival - srtt/2"


def bulk_utilization(timeline: list[Event], link_rate_bps: int
                     ) -> tuple[float | None, float]:
    """Link utilization while bulk data was pending (DESIGN.md): bytes the source put on
    the wire ÷ (link rate × time), from the start to the last progress event at which the
    disk's bulk copy or memory's first full pass (round 0) was not done. Returns it (None
    without such an event) and that time in seconds."""
    last: SimProgress | None = None
    for e in timeline:
        if not isinstance(e, SimProgress):
            continue
        if (e.disk is not None and not e.disk.get("bulk_done")) or e.round < 1:
            last = e
    if last is None or not link_rate_bps or not last.t or last.t <= 0:
        return None, 0.0
    sent = float(last.session.get("wire_bytes_out", 0))
    return round(sent * 8 / (link_rate_bps * last.t), 4), last.t


def source_report(
    src: SimSourceResult,
    *,
    total_s: float,
    downtime_s: float | None,
    client_downtime_s: float | None,
    rate_before: float | None,
    rate_during: float | None,
    wire: Mapping[str, Any],
    guest_bytes: int,
    link_rate_bps: int | None,
    ledger: LedgerCheck,
    verify: bool,
    options: Mapping[str, Any],
) -> Report:
    """The report of a migration that reached GO (``src.status`` done or in-doubt).

    ``rate_before`` / ``rate_during``: guest progress units per second before the migration
    and from its start to the pause; ``wire``: the session's ``stats()``."""
    utilization, bulk_s = (bulk_utilization(src.timeline, link_rate_bps)
                           if link_rate_bps else (None, 0.0))
    report = Report(
        status=src.status, backend="sim",
        client_downtime_ms=(None if client_downtime_s is None
                            else round(client_downtime_s * 1000, 1)),
        total_s=round(total_s, 3),
        workload_penalty=(round(1 - rate_during / rate_before, 4)
                          if rate_before and rate_during is not None else None),
        link_utilization=utilization, sdps_max_throttle=round(src.sdps_max_throttle, 3),
        rounds=src.rounds, verified=digests_equal(src, verify),
        acknowledged_writes=ledger.acknowledged, lost_acknowledged_writes=len(ledger.lost),
        error=src.error, timeline=[e.to_json() for e in src.timeline],
        details={"bulk_pending_s": round(bulk_s, 3),
                 # what mirroring added to the guest's disk-write acknowledgements
                 "max_ack_delay_ms": round(src.max_ack_delay_s * 1000, 1),
                 "p99_ack_delay_ms": round(src.p99_ack_delay_s * 1000, 1),
                 # what --max-penalty cost: the copy paced this long, at the lowest this
                 "penalty_bound": None if src.penalty_cost is None else {
                     "paced_s": round(src.penalty_cost.paced_s, 3),
                     "min_cap_Bps": src.penalty_cost.min_cap_Bps,
                     "max_penalty_seen": round(src.penalty_cost.max_penalty_seen, 4),
                     "gave_up": src.penalty_cost.gave_up},
                 "digests": {"source": {"memory": src.memory_digest,
                                        "device": src.device_digest, "disk": src.disk_digest},
                             "destination": src.ready_digests},
                 "options": dict(options)})
    report.set_downtime(downtime_s)
    report.set_wire(wire, guest_bytes)
    return report


def qemu_source_report(src: QemuSourceResult, *, total_s: float, wire: Mapping[str, Any],
                       guest_bytes: int) -> Report:
    """The report of a QEMU migration that reached GO, from the source's result and its
    session's ``stats()``. The downtime is :func:`downtime_estimate`'s from QEMU's
    pre-switchover (its vCPUs stopped) to the destination's resume; QEMU's own figure (its
    last pass only) is beside it as ``qemu_downtime_ms``."""
    srtt = wire.get("srtt_s")
    downtime, basis = downtime_estimate(
        last_progress=src.paused_at, paused_at=src.paused_at, peer_resumed_at=src.resumed_at,
        resumed_seen_at=src.resumed_seen_at,
        srtt_s=float(srtt) if isinstance(srtt, int | float) else None)
    report = Report(status=src.status, backend="qemu", total_s=round(total_s, 3),
                    sdps_max_throttle=round(src.sdps_max_throttle, 3), error=src.error,
                    timeline=[e.to_json() for e in src.timeline],
                    details={"qemu_downtime_ms": src.qemu_info.get("downtime"),
                             "disk_seq": src.disk_seq,
                             "ram_chunks_repaired": src.ram_chunks_repaired})
    report.set_downtime(downtime, basis)
    report.set_wire(wire, guest_bytes)
    return report


def aborted_report(error: BaseException, *, backend: str, source_running: bool,
                   timeline: list[dict[str, Any]], **details: Any) -> Report:
    """The report of a migration that ended before GO (the source guest runs) or failed
    after it; ``error`` is the typed error (a MigrationAborted is reported by its cause)."""
    cause = (error.__cause__ or error) if isinstance(error, MigrationAborted) else error
    return Report(status="aborted", backend=backend, error=f"{type(cause).__name__}: {cause}",
                  timeline=timeline, details={"source_running": source_running, **details})
