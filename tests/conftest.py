"""Fixtures every test folder may use."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.opsproc import Proc


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """The ``xmig`` processes a test started (append them): killed at its end, whatever
    happened."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()
