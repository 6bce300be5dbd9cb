"""The asyncio side of the page engine: pre-copy rounds over a transport session.

:class:`MemorySender` (source) runs the rounds on ``Channel.MEMORY``: fetch the dirty log,
read the pages, encode them (in a worker thread, overlapping the sends), ``send``. After
each fetch it asks the :class:`~xmig.memory.precopy.PrecopyPlanner` and reports the
verdict; :meth:`MemorySender.precopy` returns when the planner says SWITCHOVER (the
orchestrator decides when to pause) and raises :class:`~xmig.errors.NotConverging` when
the timeout passed. Once the planner says ENGAGE_SDPS, the throttle controller is updated
every interval and its throttle handed to ``SourceMemory.set_throttle``.
:meth:`MemorySender.final_round`, called with the guest paused, sends what is left and the
end-of-memory marker.

:class:`MemoryReceiver` (destination) applies messages until that marker and returns the
digest of the memory it holds (I5 is checked by comparing digests).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from xmig.digest import ChunkDigests, Read
from xmig.digest import worker as digest_worker
from xmig.errors import MigrationError, NotConverging
from xmig.memory.codec import CodecConfig, CodecStats, EndOfMemory, PageDecoder, PageEncoder
from xmig.memory.guest import PAGE_SIZE, DestinationMemory, PageIndices, SourceMemory
from xmig.memory.precopy import (
    BusyRate,
    Decision,
    Figures,
    PlannerConfig,
    PrecopyPlanner,
    Verdict,
)
from xmig.memory.sdps import ProportionalThrottle, ThrottleController
from xmig.transport import Channel, TransportSession
from xmig.transport.frames import Payload

MiB = 1 << 20


#: pages per digest chunk (:mod:`xmig.digest`): small, so a scattered last round re-reads
#: little; large enough that a full pass is not a Python loop per page
DIGEST_CHUNK_PAGES = 4


def _reader(memory: SourceMemory | DestinationMemory) -> Read:
    def read(offset: int, length: int) -> memoryview:
        first = offset // PAGE_SIZE
        return memory.read_pages(np.arange(first, first + length // PAGE_SIZE, dtype=np.int64))
    return read


def _refresh(digests: ChunkDigests, memory: SourceMemory | DestinationMemory
             ) -> asyncio.Future[int]:
    return asyncio.get_running_loop().run_in_executor(
        digest_worker(), digests.refresh, _reader(memory))


def memory_digests(memory: SourceMemory | DestinationMemory) -> ChunkDigests:
    """Chunk digests of ``memory``, all stale (the caller refreshes them)."""
    return ChunkDigests(memory.page_count * PAGE_SIZE, DIGEST_CHUNK_PAGES * PAGE_SIZE)


def memory_digest(memory: SourceMemory | DestinationMemory) -> bytes:
    """The digest of all of ``memory`` read now: equal on both sides means equal memory (I5).
    The same value :class:`~xmig.digest.ChunkDigests` keeps incrementally."""
    return memory_digests(memory).full_digest(_reader(memory))


@dataclass(frozen=True)
class SenderConfig:
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    chunk_pages: int = 4096  #: pages read and encoded at a time (16 MiB)
    tick: float = 0.02  #: seconds between looks while waiting for the link to drain
    sdps_interval: float = 0.25  #: seconds between throttle updates once SDPS is engaged
    progress_interval: float = 0.5  #: seconds between progress reports inside a round
    low_water: float = 0.05  #: next round when the backlog is ≤ this × rate past one RTT
    min_round: float = 0.05  #: seconds between dirty-log fetches at least (no spinning)
    rate_window: float = 2.0  #: seconds of busy time the memory rate is measured over


@dataclass(frozen=True)
class Progress:
    """A snapshot of the pre-copy, for progress displays and the orchestrator."""

    round: int
    round_pages: int  #: pages fetched for the current round
    pages_left: int  #: fetched pages not sent yet
    backlog_bytes: int  #: memory bytes sent and not yet acknowledged by the destination
    predicted_downtime: float
    decision: Decision
    throttle: float
    dirty_rate: float  #: bytes/s, measured over the last round
    delivery_rate: float  #: bytes/s the link gives memory
    wire_ratio: float
    pages_sent: int
    wire_bytes: int
    elapsed: float


@dataclass(frozen=True)
class FinalReport:
    rounds: int  #: pre-copy rounds, the final one included
    final_pages: int  #: pages sent with the guest paused
    final_wire_bytes: int
    seconds: float  #: from the call to the end marker queued
    digest: bytes | None
    stats: CodecStats


@dataclass(frozen=True)
class ReceiveReport:
    rounds: int
    pages: int
    messages: int
    wire_bytes: int
    digest: bytes | None  #: of the destination's memory after the marker
    source_digest: bytes | None  #: what the source sent with the marker, if anything


class MemorySender:
    """Source side of the page engine. ``sdps``: True for :class:`ProportionalThrottle`,
    False for none, or a controller (e.g. :class:`~xmig.memory.sdps.AutoConverge`).
    ``rate``, if given, says the bytes/s the link gives memory; otherwise it is measured:
    memory bytes acknowledged per second while the memory channel had a backlog (so it is
    memory's share of the link, whatever else shares it).
    The orchestrator keeps ``device_state_bytes`` current; ``mirror_queue``, if given,
    says how many bytes of disk writes wait to be mirrored (the blackout drains them too)."""

    def __init__(
        self,
        session: TransportSession,
        memory: SourceMemory,
        *,
        config: SenderConfig | None = None,
        sdps: ThrottleController | bool = True,
        on_progress: Callable[[Progress], None] | None = None,
        rate: Callable[[], float] | None = None,
        mirror_queue: Callable[[], int] | None = None,
        verify: bool = False,
        channel: int = Channel.MEMORY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session = session
        self.memory = memory
        self.config = config or SenderConfig()
        if sdps is True:
            self.controller: ThrottleController | None = ProportionalThrottle()
        else:
            self.controller = sdps or None
        planner_cfg = dataclasses.replace(self.config.planner,
                                          sdps=self.controller is not None)
        self.channel = channel
        self.on_progress = on_progress
        self.device_state_bytes = 0
        self._mirror_queue = mirror_queue or (lambda: 0)
        self.encoder = PageEncoder(memory.page_count, self.config.codec)
        self._planner_cfg = planner_cfg
        self.planner: PrecopyPlanner | None = None
        self._rate_fn = rate
        self._clock = clock
        self._rates = BusyRate(self.config.rate_window)
        self._pending: PageIndices = np.empty(0, np.int64)
        self._round_pages = 0
        self._fetched_at: float | None = None
        self._dirty_rate = 0.0
        self._ratio: float | None = None  # wire ratio of the rounds after round 0
        self._round_start = CodecStats()
        self._engaged = False
        self._next_sdps = 0.0
        self._next_progress = 0.0
        self._resend_pending = False
        # verify: chunk digests kept current through the rounds (refreshed in a worker
        # thread after each fetch), so the final digest re-reads only the last round
        self.digests = memory_digests(memory) if verify else None
        self._refreshing: asyncio.Future[int] | None = None
        self.last_verdict: Verdict | None = None
        self.rounds_log: list[tuple[int, int, float]] = []  #: (round, pages, dirty B/s)

    # -- measures ---------------------------------------------------------------------

    def _link(self) -> tuple[float, float, int]:
        """(bytes/s for memory, RTT, memory bytes not yet acknowledged)."""
        st = self.session.stats()
        rtt = float(st.get("srtt_s") or st.get("min_rtt_s") or 0.0)
        sc = self.session.session.send_channels[self.channel]
        unacked = sc.inflight_bytes + sc.pending_bytes
        if self._rate_fn is not None:
            return self._rate_fn(), rtt, unacked
        known = self._rates.rate
        busy = unacked - (known or 0.0) * rtt >= MiB
        rate = self._rates.update(now=self._clock(), delivered=sc.acked_bytes, busy=busy)
        if rate is None:  # nothing measured yet: the whole session's rate, if any
            rate = float(st.get("delivery_rate_Bps") or 0.0)
        return rate, rtt, unacked

    def wire_ratio(self) -> float:
        """Wire bytes per page byte of the dirty rounds (those after round 0); 1.0 until
        one was sent (round 0's ratio owes much to zero pages, dirty pages rarely are)."""
        return self._ratio if self._ratio is not None else 1.0

    def _figures(self, rate: float, rtt: float, unacked: int) -> Figures:
        return Figures(
            remaining_bytes=len(self._pending) * PAGE_SIZE,
            delivery_rate=rate,
            wire_ratio=self.wire_ratio(),
            # bytes within one RTT of the destination are as good as there
            backlog_bytes=max(0, int(unacked - rate * rtt)),
            device_state_bytes=self.device_state_bytes,
            mirror_queue_bytes=self._mirror_queue(),
            rtt=rtt,
            base_rtt=float(self.session.stats().get("min_rtt_s") or 0.0),
            dirty_rate=self._dirty_rate,
        )

    def snapshot(self) -> Progress:
        rate, _, unacked = self._link()
        v = self.last_verdict
        st = self.encoder.stats
        start = self.planner.start if self.planner else self._clock()
        return Progress(
            round=self.planner.round if self.planner else -1,
            round_pages=self._round_pages,
            pages_left=len(self._pending),
            backlog_bytes=unacked,
            predicted_downtime=v.predicted_downtime if v else float("inf"),
            decision=v.decision if v else Decision.CONTINUE,
            throttle=self.controller.throttle if self.controller else 0.0,
            dirty_rate=self._dirty_rate,
            delivery_rate=rate,
            wire_ratio=self.wire_ratio(),
            pages_sent=st.pages,
            wire_bytes=st.wire_bytes,
            elapsed=self._clock() - start,
        )

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.snapshot())

    # -- the rounds -------------------------------------------------------------------

    async def precopy(self) -> Verdict:
        """Run rounds until the planner says SWITCHOVER (returned: pause the guest, then
        call :meth:`final_round`; or call this again to go on). Raises NotConverging past
        the timeout. The throttle is released if this raises or is cancelled."""
        now = self._clock()
        if self.planner is None:  # a new migration: round 0 is every page, whatever an
            self.memory.mark_all_dirty()  # earlier, aborted migration fetched before
            self.planner = PrecopyPlanner(self._planner_cfg, start=now)
            self._next_progress = now
        planner = self.planner
        try:
            if self._resend_pending:
                await self._send(self._pending)
                self._pending = np.empty(0, np.int64)
            self._resend_pending = False
            caught_up = False
            while True:
                if not len(self._pending):
                    await self._wait_backlog()
                    self._fetch()
                rate, rtt, unacked = self._link()
                verdict = planner.decide(now=self._clock(),
                                         figures=self._figures(rate, rtt, unacked))
                self.last_verdict = verdict
                self._report()
                if verdict.decision is Decision.SWITCHOVER:
                    if (not caught_up and self._refreshing is not None
                            and not self._refreshing.done()):
                        caught_up = True  # once: a guest writing all along keeps it busy
                        # the digests lag (a first full pass, a busy box): let them catch up
                        # while the guest runs, not in the blackout, then decide again
                        await self._refreshing
                        await self._send(self._pending)
                        self._pending = np.empty(0, np.int64)
                        self._end_round_ratio()
                        continue
                    self._resend_pending = True
                    return verdict
                if verdict.decision is Decision.NOT_CONVERGING:
                    raise NotConverging(verdict.reason)
                if verdict.decision is Decision.ENGAGE_SDPS:
                    self._engaged = True
                    self._next_sdps = 0.0
                    if self.controller is not None:
                        self.controller.engage(verdict.reason)
                if len(self._pending):
                    await self._send(self._pending)
                    self._pending = np.empty(0, np.int64)
                    self._end_round_ratio()
                else:  # nothing dirty but it does not fit (device state, mirror): wait
                    await self._sleep_tick()
        except BaseException:
            self.release()
            raise

    def _fetch(self) -> None:
        now = self._clock()
        idx = self.memory.fetch_and_clear_dirty()
        self._pending = np.asarray(idx, np.int64)
        self._round_pages = len(idx)
        assert self.planner is not None
        if self._fetched_at is not None:
            self._dirty_rate = len(idx) * PAGE_SIZE / max(now - self._fetched_at, 1e-3)
            if self.controller is not None:
                sent = self._round_start.raw_bytes
                throttle = self.controller.on_round(
                    now=now, dirty_bytes=len(idx) * PAGE_SIZE,
                    sent_bytes=self.encoder.stats.raw_bytes - sent)
                self.memory.set_throttle(throttle)
        self._fetched_at = now
        self._mark_digests(idx)
        self._round_start = self.encoder.stats.copy()
        self.planner.on_round(len(idx) * PAGE_SIZE)
        self.rounds_log.append((self.planner.round, len(idx), self._dirty_rate))

    def _mark_digests(self, idx: PageIndices) -> None:
        """After a fetch: the fetched pages' chunks are stale; refresh in the background."""
        if self.digests is None:
            return
        self.digests.mark_chunks(np.asarray(idx, np.int64) // DIGEST_CHUNK_PAGES)
        if self._refreshing is None or self._refreshing.done():
            if self._refreshing is not None:
                self._refreshing.result()  # a failed refresh fails the pre-copy
            self._refreshing = _refresh(self.digests, self.memory)

    def _end_round_ratio(self) -> None:
        assert self.planner is not None
        st, before = self.encoder.stats, self._round_start
        raw = st.raw_bytes - before.raw_bytes
        if self.planner.round >= 1 and raw:
            r = (st.wire_bytes - before.wire_bytes) / raw
            self._ratio = r if self._ratio is None else 0.5 * (self._ratio + r)

    async def _wait_backlog(self) -> None:
        """Wait until the memory backlog past one RTT is small, so the next round is
        fetched late enough to be worth sending and early enough to keep the link busy."""
        assert self.planner is not None
        while True:
            rate, rtt, unacked = self._link()
            low = max(2 * MiB, rate * (rtt + self.config.low_water))
            now = self._clock()
            timed_out = now - self.planner.start >= self.planner.config.timeout
            soon = (self._fetched_at is not None
                    and now - self._fetched_at < self.config.min_round)
            if (unacked <= low and not soon) or timed_out:
                return
            await self._sleep_tick()

    async def _sleep_tick(self) -> None:
        await asyncio.sleep(self.config.tick)
        self._tick()

    def _tick(self) -> None:
        """Between sends: the timeout, the throttle update and progress report when due."""
        now = self._clock()
        assert self.planner is not None
        if now - self.planner.start >= self.planner.config.timeout:
            raise NotConverging(
                f"pre-copy ran past its timeout of {self.planner.config.timeout:.0f} s in "
                f"round {self.planner.round}")
        ctl = self.controller
        if ctl is not None and (self._engaged or ctl.always_updated) and now >= self._next_sdps:
            self._next_sdps = now + self.config.sdps_interval
            rate, _, _ = self._link()
            throttle = ctl.update(
                now=now, delivery_rate=rate, dirty_rate=self.memory.dirty_rate(),
                wire_ratio=self.wire_ratio())
            self.memory.set_throttle(throttle)
        if now >= self._next_progress:
            self._next_progress = now + self.config.progress_interval
            self._report()

    def _encode(self, idx: PageIndices, data: memoryview) -> list[bytes]:
        return self.encoder.encode(idx, data)

    async def _send(self, indices: PageIndices, *, final: bool = False) -> None:
        """Read, encode (in a worker thread, one chunk ahead) and send ``indices``."""
        step = self.config.chunk_pages
        chunks = [indices[k:k + step] for k in range(0, len(indices), step)]
        if not chunks:
            return
        nxt = asyncio.ensure_future(asyncio.to_thread(
            self._encode, chunks[0], self.memory.read_pages(chunks[0])))
        try:
            for k in range(len(chunks)):
                msgs = await nxt
                if k + 1 < len(chunks):
                    data = self.memory.read_pages(chunks[k + 1])
                    nxt = asyncio.ensure_future(asyncio.to_thread(
                        self._encode, chunks[k + 1], data))
                for m in msgs:
                    await self.session.send(self.channel, m)
                    if not final:
                        self._tick()
        except BaseException:
            if not nxt.done():  # let the worker finish before the encoder is used again
                with contextlib.suppress(BaseException):
                    await asyncio.shield(nxt)
            raise

    def release(self) -> None:
        """Full speed for the guest (switchover, abort). Idempotent."""
        if self.controller is not None:
            self.controller.release()
        self._engaged = False
        self.memory.set_throttle(0.0)

    async def final_round(self, *, digest: bool = False) -> FinalReport:
        """With the guest paused: send every page still dirty and the end marker (with
        the memory digest when ``digest``). The throttle is released first."""
        t0 = self._clock()
        self.release()
        before = self.encoder.stats.copy()
        idx = np.union1d(self._pending, self.memory.fetch_and_clear_dirty()).astype(np.int64)
        self._pending = np.empty(0, np.int64)
        self._resend_pending = False
        d: bytes | None = None
        if digest and self.digests is not None:
            self.digests.mark_chunks(idx // DIGEST_CHUNK_PAGES)
        await self._send(idx, final=True)  # first: the refresh may still be running
        if digest and self.digests is None:
            d = await asyncio.to_thread(memory_digest, self.memory)
        elif digest and self.digests is not None:
            if self._refreshing is not None:
                await self._refreshing
            await _refresh(self.digests, self.memory)
            d = self.digests.digest()
        rounds = (self.planner.round + 1 if self.planner else 0) + 1
        await self.session.send(self.channel, self.encoder.end(rounds=rounds, digest=d))
        st = self.encoder.stats
        return FinalReport(rounds, len(idx), st.wire_bytes - before.wire_bytes,
                           self._clock() - t0, d, st.copy())


class MemoryReceiver:
    """Destination side: applies messages (in a worker thread, so the session keeps
    reading) until the end marker."""

    def __init__(self, session: TransportSession, memory: DestinationMemory, *,
                 channel: int = Channel.MEMORY, digest: bool = True) -> None:
        self.session = session
        self.memory = memory
        self.channel = channel
        self.digest = digest
        self.decoder = PageDecoder(memory.page_count)
        # digest: chunk digests refreshed after each message, so the end costs little
        self.digests = memory_digests(memory) if digest else None

    def _apply(self, msg: Payload) -> EndOfMemory | None:
        digests = self.digests
        if digests is None:
            return self.decoder.feed(msg, self.memory)
        return self.decoder.feed(msg, self.memory, on_applied=lambda idx: digests.mark_chunks(
            idx // DIGEST_CHUNK_PAGES))

    async def run(self) -> ReceiveReport:
        """Apply until the end marker; raise ProtocolError on a bad message (nothing of
        it applied) and MigrationError if the source's digest differs from ours."""
        refreshing: asyncio.Future[int] | None = None
        while True:
            msg = await self.session.recv(self.channel)
            end = await asyncio.to_thread(self._apply, msg)
            if end is not None:
                break
            if self.digests is not None and (refreshing is None or refreshing.done()):
                if refreshing is not None:
                    refreshing.result()
                refreshing = _refresh(self.digests, self.memory)
        assert end is not None
        mine: bytes | None = None
        if self.digests is not None:
            if refreshing is not None:
                await refreshing
            await _refresh(self.digests, self.memory)
            mine = self.digests.digest()
        if mine is not None and end.digest is not None and mine != end.digest:
            raise MigrationError(
                f"memory digest {mine.hex()} differs from the source's {end.digest.hex()}")
        st = self.decoder.stats
        return ReceiveReport(end.rounds, st.pages, st.messages, st.wire_bytes, mine,
                             end.digest)
