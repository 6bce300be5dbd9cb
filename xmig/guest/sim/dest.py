"""The destination agent: receives one migration on a session and runs the guest on GO.

    NEGOTIATE -> create an empty disk image (DiskReceiver) and a paused incoming guest whose
                 disk is served from that image; answer PREPARED (or REFUSED: typed)
    RECEIVING -> apply pages (MemoryReceiver) and disk writes until FINAL + device state
    READY     -> fsync, journal READY, send READY with the digests; the guest stays paused
    RUNNING   -> on GO: journal, load the device state, resume; send RESUMED
    DISCARDED -> on ABORT (or failure before READY): quit the guest, delete the image
    in doubt  -> READY, then the source is lost before GO: the guest stays paused, the
                 image kept; :class:`~xmig.errors.InDoubt` is raised and :func:`resolve`
                 settles it with the source's journaled decision

The destination resumes only on GO (I1); it applies no write of an older epoch (I3).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from xmig import guestctl
from xmig.errors import (
    MigrationError,
    ProtocolError,
    XmigError,
)
from xmig.guest.backend import DestBackend, DestResult
from xmig.guest.sim import SimConfig, SimGuest
from xmig.hostpolicy import DEFAULT_POLICY, HostPolicy, check_resources
from xmig.memory.engine import MemoryReceiver
from xmig.private import private_dir
from xmig.protocol import control
from xmig.protocol.commit import Effects
from xmig.storage.engine import DiskReceiver
from xmig.storage.nbd import NbdServer
from xmig.storage.raw import RawFileBackend
from xmig.transport import Channel, TransportSession


@dataclass
class SimDestResult(DestResult):
    """What a reference guest's destination holds: on success the running guest, its image
    and NBD server (the caller owns them from then on)."""

    guest: SimGuest | None = None
    image: RawFileBackend | None = None
    nbd: NbdServer | None = None
    digests: dict[str, str] = field(default_factory=dict)
    receiver: DiskReceiver | None = None  #: kept while in doubt


#: what this host names the files of an arriving guest, in its own (new, private) workdir
IMAGE_NAME, NBD_NAME, LEDGER_NAME = "disk.raw", "disk.nbd", "guest.ledger"


def incoming_sim_config(spec: control.SimSpec, *, workdir: Path,
                        policy: HostPolicy) -> SimConfig:
    """The destination guest: the source's definition, this host's paths, nice and address
    (ConfigError for a definition the guest cannot run)."""
    inf = float("inf")
    return SimConfig(
        ram_bytes=spec.ram_bytes, disk_bytes=spec.disk_bytes, workload=spec.workload,
        rate_Bps=inf if spec.rate_Bps is None else spec.rate_Bps,
        hotset_bytes=spec.hotset_bytes, seed=spec.seed, zero_fraction=spec.zero_fraction,
        text_fraction=spec.text_fraction, write_size=spec.write_size,
        disk_rate_Bps=inf if spec.disk_rate_Bps is None else spec.disk_rate_Bps,
        table_bytes=spec.table_bytes, oltp_keys=spec.oltp_keys,
        disk_queue_depth=spec.disk_queue_depth,
        udp_addr=(policy.udp_host, 0) if spec.udp else None,
        nice=policy.guest_nice, shm_dir=str(policy.shm_dir),
        disk_url=f"nbd+unix:///?socket={workdir / NBD_NAME}",
        ledger_path=str(workdir / LEDGER_NAME))


class SimDest(DestBackend):
    """The reference guest's destination: an empty image filled by the disk engine
    (DiskReceiver), a paused incoming guest whose RAM the page engine (MemoryReceiver)
    fills and whose disk is served from that image by this host's NBD server."""

    def __init__(self, *, workdir: Path, reply_timeout_s: float = 300.0,
                 policy: HostPolicy = DEFAULT_POLICY,
                 result: SimDestResult | None = None) -> None:
        self.workdir, self.policy, self.reply_timeout_s = workdir, policy, reply_timeout_s
        self.result: SimDestResult = result or SimDestResult()
        self._verify = False

    async def prepare(self, session: TransportSession, negotiate: control.Negotiate) -> None:
        """Check, then make: the image, its receiver, the NBD server, the paused guest."""
        msg, result, workdir = negotiate, self.result, self.workdir
        if not isinstance(msg.guest, control.SimGuest):
            raise MigrationError(f"unsupported guest backend {msg.guest.backend!r}")
        if msg.guest.config.ram_bytes != msg.ram_bytes:
            raise ProtocolError("negotiate: ram_bytes differs from the guest's")
        self._verify = msg.guest.verify
        private_dir(workdir, exist_ok=True)
        check_resources(self.policy, ram_bytes=msg.ram_bytes, disk_bytes=msg.disk_bytes,
                        workdir=workdir)
        config = incoming_sim_config(msg.guest.config, workdir=workdir, policy=self.policy)
        image = RawFileBackend.create(workdir / IMAGE_NAME, msg.disk_bytes)
        result.image = image
        receiver = DiskReceiver(session, image, epoch=msg.epoch, fresh=True,
                                verify=msg.guest.verify)
        result.receiver = receiver
        await receiver.start()
        nbd = NbdServer(image)
        result.nbd = nbd
        await nbd.start_unix(workdir / NBD_NAME)
        result.guest = await asyncio.to_thread(
            SimGuest.start_incoming, config, workdir=workdir, name="incoming")
        self._session = session

    async def receive(self, final: Any) -> control.Final:
        """Pages and disk writes until FINAL and the device state; all applied and fsynced,
        the digests taken, the device state loaded into the paused guest."""
        result, session = self.result, self._session
        assert result.guest is not None and result.receiver is not None
        memory = MemoryReceiver(session, result.guest.memory, digest=self._verify)
        applying = asyncio.create_task(memory.run())
        try:
            word = await final
            if not isinstance(word, control.Final):
                raise control.unexpected(word, "final", peer="source")
            report = await applying
        finally:  # never leave the receiver running (or its error unretrieved)
            if not applying.done():
                applying.cancel()
            await asyncio.wait([applying])
        async with asyncio.timeout(self.reply_timeout_s):
            state = await session.recv(Channel.DEVICE_STATE)
        if len(state) != word.device_state_bytes:
            raise ProtocolError("device state length differs from FINAL's")
        await result.receiver.wait_applied(word.disk_seq)
        await result.receiver.flush()
        result.digests = {
            "memory": report.digest.hex() if report.digest else "",
            "device": xxhash.xxh3_64_hexdigest(bytes(state)),
        }
        if self._verify:
            result.digests["disk"] = await result.receiver.current_digest()
        # the paused guest takes its device state now, so GO only has to resume it
        await guestctl.call(result.guest.load_device_state, bytes(state))
        return word

    async def vote(self, decision: Any) -> dict[str, str]:
        return self.result.digests

    def go_effects(self) -> Effects:
        guest = self.result.guest
        assert guest is not None

        async def resume_guest() -> None:
            await guestctl.call(guest.resume)

        return Effects(resume_guest=resume_guest)

    async def after_resume(self) -> None:
        if self.result.receiver is not None:
            await self.result.receiver.stop()

    async def discard(self) -> None:
        """Throw away what was received: the guest process, the NBD server, the image."""
        await _discard(self.result, self.result.receiver)


async def _discard(result: SimDestResult, receiver: DiskReceiver | None) -> None:
    """Throw away what was received: the guest process, the NBD server, the image."""
    if receiver is not None:
        with contextlib.suppress(XmigError):
            await receiver.stop()
    if result.guest is not None:
        await asyncio.to_thread(result.guest.quit)
        result.guest = None
    if result.nbd is not None:
        await result.nbd.close()
        result.nbd = None
    if result.image is not None:
        path = result.image.path
        result.image.close()
        result.image = None
        with contextlib.suppress(OSError):
            path.unlink()
