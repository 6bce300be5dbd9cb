"""Whatever fails on the destination, typed or not, at any step of its preparation, the same
cleanup runs: no image, socket or guest process is left, DISCARDED is journaled, and the
source hears why (REFUSED before PREPARED, ABORT after)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.inject import after, instead
from tests.transport.stacks import make_stack, session_pair
from xmig.errors import ResourceLimit
from xmig.guest.sim import SimGuest
from xmig.guest.sim import dest as agent
from xmig.guest.sim.dest import IMAGE_NAME, NBD_NAME
from xmig.hostpolicy import HostPolicy
from xmig.memory.engine import MemoryReceiver
from xmig.orchestrator.run import receive_migration
from xmig.protocol import control
from xmig.protocol.journal import Journal
from xmig.storage.engine import DiskReceiver
from xmig.storage.nbd import NbdServer
from xmig.storage.raw import RawFileBackend
from xmig.transport import Channel

TOKEN = "ab" * 16
MiB = 1 << 20


def negotiate(ram: int = 8 * MiB, disk: int = 4 * MiB) -> control.Negotiate:
    spec = control.SimSpec(ram_bytes=ram, disk_bytes=disk, table_bytes=MiB, hotset_bytes=MiB)
    return control.Negotiate("vm1", 1, control.SimGuest(spec, verify=False), disk, ram, TOKEN)


STEPS: dict[str, Callable[[pytest.MonkeyPatch, BaseException], None]] = {
    "check_resources": lambda mp, e: mp.setattr(agent, "check_resources", instead(e)),
    "guest config": lambda mp, e: mp.setattr(agent, "incoming_sim_config", instead(e)),
    "image": lambda mp, e: mp.setattr(RawFileBackend, "create", instead(e)),
    "disk receiver": lambda mp, e: mp.setattr(DiskReceiver, "start",
                                              after(DiskReceiver.start, e)),
    "nbd server": lambda mp, e: mp.setattr(NbdServer, "start_unix",
                                           after(NbdServer.start_unix, e)),
    "guest": lambda mp, e: mp.setattr(SimGuest, "start_incoming", instead(e)),
}


async def run_destination(tmp_path: Path, policy: HostPolicy | None = None
                          ) -> tuple[BaseException | None, list[control.Message], Path]:
    """Negotiate with a destination; returns what it raised, what the source heard, and
    its workdir."""
    workdir = tmp_path / "dst"
    journal = Journal(workdir / "journal")
    heard: list[control.Message] = []
    with make_stack("plain", tmp_path) as stack:
        async with session_pair(stack) as (src, dst):
            receiving = asyncio.create_task(receive_migration(
                dst, workdir=workdir, journal=journal, reply_timeout_s=20,
                policy=policy or HostPolicy()))
            await src.send(Channel.CONTROL, negotiate().encode())
            async with asyncio.timeout(30):
                while not isinstance(heard[-1] if heard else None,
                                     control.Refused | control.Abort):
                    heard.append(control.decode(await src.recv(Channel.CONTROL)))
            done, _ = await asyncio.wait([receiving], timeout=30)
            assert done, "the destination did not end"
            error = receiving.exception()
    return error, heard, workdir


def assert_nothing_left(workdir: Path) -> None:
    assert not (workdir / IMAGE_NAME).exists()
    assert not (workdir / NBD_NAME).exists()
    records = Journal(workdir / "journal").records()
    assert [r.kind for r in records] == ["DISCARDED"]


@pytest.mark.parametrize("exc_type", [MemoryError, IndexError])
@pytest.mark.parametrize("step", sorted(STEPS))
async def test_an_untyped_failure_at_each_preparation_step_is_cleaned_up_and_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str,
        exc_type: type[BaseException]) -> None:
    STEPS[step](monkeypatch, exc_type("injected"))
    error, heard, workdir = await run_destination(tmp_path)
    assert isinstance(error, exc_type)
    assert isinstance(heard[-1], control.Refused) and heard[-1].error == "MigrationError"
    assert "injected" in heard[-1].reason
    assert_nothing_left(workdir)


@pytest.mark.parametrize("exc_type", [MemoryError, IndexError])
async def test_an_untyped_failure_after_prepared_aborts_and_discards_the_guest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc_type: type[BaseException]
        ) -> None:
    started: list[SimGuest] = []
    real = SimGuest.start_incoming

    def spy(*args: Any, **kwargs: Any) -> SimGuest:
        started.append(real(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(SimGuest, "start_incoming", spy)
    monkeypatch.setattr(MemoryReceiver, "run", instead(exc_type("injected")))
    error, heard, workdir = await run_destination(tmp_path)
    assert isinstance(error, exc_type)
    assert isinstance(heard[0], control.Prepared) and isinstance(heard[-1], control.Abort)
    assert started and started[0].process.poll() is not None  # the guest process quit
    assert_nothing_left(workdir)


async def test_a_guest_over_the_agents_limits_is_refused_before_anything_is_made(
        tmp_path: Path) -> None:
    for policy, words in ((HostPolicy(max_ram_bytes=4 * MiB), "--max-ram"),
                          (HostPolicy(max_disk_bytes=MiB), "--max-disk")):
        error, heard, workdir = await run_destination(tmp_path / words, policy)
        assert isinstance(error, ResourceLimit) and words in str(error)
        assert isinstance(heard[-1], control.Refused) and heard[-1].error == "ResourceLimit"
        assert isinstance(heard[-1].as_error(), ResourceLimit)
        assert_nothing_left(workdir)
        assert sorted(p.name for p in workdir.iterdir()) == ["journal"]
