"""Fixtures of the reference-guest tests: guests that are always quit, small configs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from xmig.guest.sim import SimConfig, SimGuest

MiB = 1 << 20

GuestFactory = Callable[..., SimGuest]


def small_config(**overrides: Any) -> SimConfig:
    """A 16 MiB guest (1 MiB table, 1 MiB hot set) unless overridden."""
    fields: dict[str, Any] = {
        "ram_bytes": 16 * MiB, "table_bytes": 1 * MiB, "hotset_bytes": 1 * MiB, "seed": 7,
        "oltp_keys": 1024,
    }
    fields.update(overrides)
    return SimConfig(**fields)


@pytest.fixture
def guests(tmp_path: Path) -> Iterator[GuestFactory]:
    """``guests(config, incoming=False, **kw)`` starts a guest that is quit after the test."""
    started: list[SimGuest] = []

    def start(config: SimConfig, *, incoming: bool = False, **kw: Any) -> SimGuest:
        if incoming:
            guest = SimGuest.start_incoming(config, workdir=tmp_path, **kw)
        else:
            guest = SimGuest.start(config, workdir=tmp_path, **kw)
        started.append(guest)
        return guest

    yield start
    for guest in started:
        guest.quit()
