"""Measure the link to an agent before migrating (``xmig migrate --plan``).

The source opens a session as it would to migrate (same TLS, same streams, same rate cap)
and says ``probe``; for the given seconds it keeps the bulk channel backlogged with filler,
which the agent consumes and drops, then says ``probe-end`` and the agent answers
``probed`` with what it received. The link's rate is the most the session delivered (bytes
acknowledged) in any 0.5 s while the filler was backlogged: a windowed maximum, as the
convergence controller reads the link. Its RTT is the session's smallest (the path's,
without the filler's queue).

The agent keeps nothing: no directory, no journal, not a migration (an ``agent --once``
takes one after a probe).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from xmig.errors import ProtocolError
from xmig.protocol import control
from xmig.transport.channels import Channel
from xmig.transport.driver import TransportSession

FILLER = bytes(256 << 10)  #: one filler message (TLS encrypts it: zeros cost the link in full)
SAMPLE_S = 0.1
WINDOW_SAMPLES = 5  #: the rate is the best over windows of this many samples (0.5 s)
#: how long past its announced seconds a probe may take (the last filler, the answer)
GRACE_S = 30.0


@dataclass(frozen=True)
class LinkSample:
    """What a probe measured."""

    rate_Bps: float  #: payload bytes/s the session delivered, at best
    rtt_s: float  #: the smallest round trip the session saw
    srtt_s: float  #: the smoothed round trip at the end (with the filler's queue)
    sent_bytes: int
    received_bytes: int  #: as the agent counted them
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


async def probe_link(session: TransportSession, seconds: float) -> LinkSample:
    """Measure the link under ``session`` for ``seconds`` (at most control.MAX_PROBE_S)."""
    await session.send(Channel.CONTROL, control.Probe(seconds=seconds).encode())
    sent = 0
    best = 0.0
    t0 = time.monotonic()

    async def fill() -> None:
        nonlocal sent
        while True:
            await session.send(Channel.DISK_BULK, FILLER)
            sent += len(FILLER)

    async def sample() -> None:
        nonlocal best
        acked: deque[tuple[float, int]] = deque(maxlen=WINDOW_SAMPLES + 1)
        while True:
            await asyncio.sleep(SAMPLE_S)  # a sampling period
            now, total = time.monotonic(), session.stats().get("acked_bytes")
            if not isinstance(total, int):
                continue
            acked.append((now, total))
            if len(acked) == acked.maxlen:
                (t_a, a), (t_b, b) = acked[0], acked[-1]
                best = max(best, (b - a) / (t_b - t_a))

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(fill()), tg.create_task(sample())]
        await asyncio.sleep(seconds)  # the measurement window
        for task in tasks:
            task.cancel()
    await session.send(Channel.CONTROL, control.ProbeEnd(sent_bytes=sent).encode())
    async with asyncio.timeout(GRACE_S):
        reply = control.decode(await session.recv(Channel.CONTROL))
    if not isinstance(reply, control.Probed):
        raise control.unexpected(reply, "probed", peer="destination")
    st = session.stats()
    return LinkSample(rate_Bps=best, rtt_s=float(st.get("min_rtt_s") or 0.0),
                      srtt_s=float(st.get("srtt_s") or 0.0), sent_bytes=sent,
                      received_bytes=reply.received_bytes,
                      seconds=round(time.monotonic() - t0, 3))


async def answer_probe(session: TransportSession, probe: control.Probe) -> int:
    """The agent's side: drop the filler until the source's ``probe-end`` and all it says it
    sent; answer ``probed``. Bounded by the probe's seconds plus :data:`GRACE_S`: a source
    that says more than it sends, or anything but ``probe-end``, fails typed
    (ProtocolError). Returns the bytes dropped (filler past what it said is dropped with
    the session)."""
    received = 0
    end: control.ProbeEnd | None = None

    async def drop() -> None:
        nonlocal received
        while end is None or received < end.sent_bytes:
            received += len(await session.recv(Channel.DISK_BULK))

    dropping = asyncio.create_task(drop())
    try:
        async with asyncio.timeout(probe.seconds + GRACE_S):
            msg = control.decode(await session.recv(Channel.CONTROL))
            if not isinstance(msg, control.ProbeEnd):
                raise ProtocolError(f"expected probe-end, got {msg.type}")
            end = msg
            if received < end.sent_bytes:
                await dropping
    except TimeoutError as err:
        raise ProtocolError(f"probe: {received} filler bytes received in "
                            f"{probe.seconds + GRACE_S:g} s, "
                            f"{'no end' if end is None else end.sent_bytes} said") from err
    finally:
        dropping.cancel()
    if received != end.sent_bytes:
        raise ProtocolError(f"probe: {received} filler bytes received, "
                            f"{end.sent_bytes} said sent")
    await session.send(Channel.CONTROL, control.Probed(received_bytes=received).encode())
    return received
