"""Pause, device state, and resume in a new process: the guest continues exactly."""

from __future__ import annotations

import numpy as np
import pytest

from xmig.errors import GuestStateError
from xmig.guest.sim import (
    DowntimeProbe,
    SimClient,
    decode_device_state,
    downtime_s,
)

from .conftest import GuestFactory, small_config
from .helpers import copy_ram, measure, migrate, replay


@pytest.mark.parametrize("workload", ["uniform", "hotset", "scan", "oltp"])
def test_resumed_guest_continues_like_an_uninterrupted_run(
    workload: str, guests: GuestFactory
) -> None:
    """RAM and RNG of the destination after more work equal an in-process run of the same
    seed that was never interrupted, to the same progress."""
    config = small_config(workload=workload, rate_Bps=30e6, seed=41)
    source = guests(config)
    destination = guests(config, incoming=True)
    source.wait_until(lambda p: p.counter >= 2000, timeout=10)
    state = migrate(source, destination)
    paused_at = decode_device_state(state)["workload"]["progress"]
    assert destination.progress().counter >= paused_at
    destination.wait_until(lambda p: p.counter >= paused_at + 3000, timeout=10)
    destination.pause()
    final = decode_device_state(destination.device_state())["workload"]
    digest, reference = replay(config, final["progress"])
    assert destination.digest() == digest
    assert final["rng"] == reference.rng.bit_generator.state


def test_progress_and_counters_continue_and_downtime_is_measured(guests: GuestFactory) -> None:
    config = small_config(workload="uniform", rate_Bps=20e6)
    source = guests(config)
    destination = guests(config, incoming=True)
    assert destination.paused and destination.state == "incoming"
    measure(source, 0.2)
    migrate(source, destination)
    at_pause = source.progress()
    assert at_pause.state == "paused" and at_pause.paused_at_mono >= at_pause.last_progress_mono
    after = destination.wait_until(lambda p: p.counter > at_pause.counter + 1000, timeout=10)
    assert after.page_writes > at_pause.page_writes
    assert after.first_progress_after_resume_mono >= after.resumed_at_mono > at_pause.paused_at_mono
    assert 0 < downtime_s(at_pause, after) < 2.0
    # the destination is now a source: its first fetch returns every page
    assert destination.memory.fetch_and_clear_dirty().size == destination.memory.page_count


def test_udp_keys_survive_the_move(guests: GuestFactory) -> None:
    """PUT before and during a migration; every acknowledged key reads back from the
    destination, which answers on the source's address."""
    config = small_config(workload="oltp", rate_Bps=10e6, udp_addr=("127.0.0.1", 0))
    source = guests(config)
    address = source.udp_address
    assert address is not None
    destination = guests(config, incoming=True)
    with SimClient(address) as client:
        client.put(b"greeting", b"hello from the source")
        assert client.get(b"greeting") == b"hello from the source"
        assert client.get(b"absent") is None
        with pytest.raises(ValueError):
            client.put(b"k" * 49, b"v")
        probe = DowntimeProbe(address, put_keys=True).start()
        measure(source, 0.2)
        migrate(source, destination)
        assert destination.udp_address == address
        measure(destination, 0.2)
        report = probe.stop()
        assert client.get(b"greeting") == b"hello from the source"
        assert report.acknowledged and report.missing(client) == []
        assert 0 < report.max_gap_s < 2.0
        assert client.ping() == destination.progress().counter or client.ping() > 0


def test_state_rules(guests: GuestFactory) -> None:
    config = small_config(workload="uniform", rate_Bps=5e6)
    source = guests(config)
    destination = guests(config, incoming=True)
    with pytest.raises(GuestStateError):
        source.device_state()  # running
    with pytest.raises(GuestStateError):
        destination.resume()  # no device state yet
    with pytest.raises(GuestStateError):
        destination.device_state()
    with pytest.raises(GuestStateError):
        destination.load_device_state(b"not a state")
    source.pause()
    source.pause()  # idempotent
    state = source.device_state()
    with pytest.raises(GuestStateError):
        source.load_device_state(state)  # not incoming
    bigger = guests(small_config(ram_bytes=32 << 20), incoming=True)
    with pytest.raises(GuestStateError, match="32"):
        bigger.load_device_state(state)
    copy_ram(source, destination)
    destination.load_device_state(state)
    with pytest.raises(GuestStateError):
        destination.load_device_state(state)  # only once
    source.resume()  # an aborted migration: the source runs on
    source.wait_until(lambda p: p.state == "running" and p.counter > 0, timeout=5)
    source.quit()
    with pytest.raises(GuestStateError):
        source.pause()
    assert source.state == "exited"


def test_probe_notices_keys_a_migration_lost(guests: GuestFactory) -> None:
    """The check has teeth: a destination whose table pages were not transferred is caught."""
    config = small_config(workload="idle", udp_addr=("127.0.0.1", 0))
    source = guests(config)
    destination = guests(config, incoming=True)
    assert source.udp_address is not None
    probe = DowntimeProbe(source.udp_address, put_keys=True, key_space=64).start()
    source.wait_until(lambda p: p.udp_requests >= 100, timeout=10)
    source.pause()
    report = probe.stop()
    copy_ram(source, destination)
    table = np.arange(config.data_pages, config.page_count, dtype=np.int64)
    destination.memory.zero_pages(table)
    destination.load_device_state(source.device_state())
    destination.resume()
    with SimClient(source.udp_address) as client:
        assert len(report.acknowledged) == 64
        assert sorted(report.missing(client)) == sorted(report.acknowledged)


def test_probe_in_its_own_process_reports_like_the_thread(guests: GuestFactory) -> None:
    """The probe process (used where the caller's own process is busy migrating) sees the
    pause as a gap and hands back every acknowledged key."""
    config = small_config(workload="idle", udp_addr=("127.0.0.1", 0))
    source = guests(config)
    assert source.udp_address is not None
    probe = DowntimeProbe(source.udp_address, put_keys=True, key_space=64,
                          own_process=True).start()
    source.wait_until(lambda p: p.udp_requests >= 100, timeout=10)
    source.pause()
    paused = source.progress().paused_at_mono
    report = probe.stop()
    assert report.answered >= 100 and len(report.acknowledged) == 64
    assert report.gap_start_mono <= paused + 0.05 and report.max_gap_s > 0
    source.resume()
    with SimClient(source.udp_address) as client:
        assert report.missing(client) == []
