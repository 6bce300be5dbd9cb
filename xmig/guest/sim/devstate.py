"""The reference guest's device state: its "registers", as versioned, self-describing JSON.

Top level (``format`` and ``version`` first, so any reader can tell what it holds)::

    format      "xmig-sim-device-state"
    version     1
    ram_bytes, page_size
    table       first_page, pages, slot_bytes, entries        (the table's data is in RAM)
    workload    spec (name, rates, hot set, seed, …), progress, cursors, disk counters,
                rng / disk_rng (numpy bit_generator states)
    counters    page_writes, dirty_marks, udp_requests
    clock       paused_at_mono/_wall, last_progress_mono/_wall (the source's, for downtime)
    udp_port    the port the service was bound to (a destination configured with port 0
                takes it)
"""

from __future__ import annotations

import json
from typing import Any

from xmig.errors import GuestStateError

FORMAT = "xmig-sim-device-state"
VERSION = 1


def encode_device_state(fields: dict[str, Any]) -> bytes:
    body = {"format": FORMAT, "version": VERSION, **fields}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def decode_device_state(data: bytes) -> dict[str, Any]:
    """The fields of a device state; GuestStateError if ``data`` is not one this build reads."""
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GuestStateError(f"not a reference-guest device state: {err}") from err
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise GuestStateError("not a reference-guest device state")
    if body.get("version") != VERSION:
        raise GuestStateError(f"device state version {body.get('version')} (this build: {VERSION})")
    for key in ("ram_bytes", "page_size", "table", "workload", "counters", "clock"):
        if key not in body:
            raise GuestStateError(f"device state without {key!r}")
    return body
