"""Fixtures and markers of the WAN emulator tests.

Tests marked ``root`` need root and /dev/net/tun; they are skipped only when those are missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xmig.netem import tun_available

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if tun_available():
        return
    skip = pytest.mark.skip(reason=f"needs root and /dev/net/tun (euid {os.geteuid()})")
    for item in items:
        if "root" in item.keywords and HERE in item.path.parents:
            item.add_marker(skip)
