"""The control messages (``xmig.protocol.control.decode``): JSON from the peer, one per message."""

from __future__ import annotations

import json
from typing import Any

from xmig.errors import XmigError
from xmig.protocol import control

from .core import Target
from .mutate import json_mutation

KEYS = ("type", "migration", "epoch", "guest", "disk_bytes", "ram_bytes", "token", "error",
        "reason", "disk_seq", "device_state_bytes", "digests", "at", "backend", "config")

_SIM = {"backend": "sim", "config": {"ram_bytes": 64 << 20, "disk_bytes": 1 << 30,
                                     "workload": "oltp", "rate_Bps": 2e7, "seed": 7}}
_QEMU = {"backend": "qemu", "config": {"ram_mb": 256, "smp": 2, "append": "console=ttyS0",
                                       "name": "vm1"}}
_TOKEN = "0123456789abcdef" * 2

SEEDS: list[dict[str, Any]] = [
    {"type": "negotiate", "migration": "m-1", "epoch": 1, "guest": _SIM,
     "disk_bytes": 1 << 30, "ram_bytes": 64 << 20, "token": _TOKEN},
    {"type": "negotiate", "migration": "m.2", "epoch": 3, "guest": _QEMU,
     "disk_bytes": 0, "ram_bytes": 256 << 20},
    {"type": "negotiate", "migration": "m3", "epoch": 1, "guest": {"backend": "sim",
     "ram_bytes": 1 << 20}, "disk_bytes": 0, "ram_bytes": 1 << 20},  # the old shape
    {"type": "prepared", "migration": "m-1"},
    {"type": "refused", "migration": "m-1", "error": "DiskTooSmall", "reason": "too small"},
    {"type": "refused", "migration": "", "error": "ProtocolError", "reason": "?"},
    {"type": "final", "migration": "m-1", "epoch": 1, "disk_seq": 12,
     "device_state_bytes": 4096},
    {"type": "ready", "migration": "m-1", "epoch": 1,
     "digests": {"memory": "ab" * 16, "disk": "cd" * 16, "ram_stale": "AAAAAA=="}},
    {"type": "go", "migration": "m-1", "epoch": 1, "token": _TOKEN},
    {"type": "abort", "migration": "m-1", "epoch": 1, "reason": "operator", "token": _TOKEN},
    {"type": "resumed", "migration": "m-1", "epoch": 1, "at": 12.5},
]


def seeds() -> list[bytes]:
    """The seed messages, as the module encodes them when it decodes them (else as JSON)."""
    out = []
    for body in SEEDS:
        raw = json.dumps(body).encode()
        try:
            out.append(control.decode(raw).encode())
        except XmigError:
            out.append(raw)
    return out


def run(data: bytes) -> str:
    return type(control.decode(data)).__name__


def nasty() -> list[bytes]:
    neg = dict(SEEDS[0])
    out = [b"[" * 200000, b'{"type":' * 100000, b"{" * 5000, b"[" * 5000 + b"]" * 5000,
           b'{"type": "negotiate"' + b', "x": 1' * 100000 + b"}", b"\xff\xfe", b"",
           b'{"type": "go", "migration": "m", "epoch": 1e999}']
    for key, val in (("migration", "../../etc/passwd"), ("migration", "/abs"), ("epoch", "1"),
                     ("ram_bytes", 1 << 50), ("disk_bytes", -1), ("guest", [1]),
                     ("epoch", 1 << 64), ("migration", "x" * 100000), ("guest", None)):
        out.append(json.dumps({**neg, key: val}).encode())
    out.append(b'{"type": "negotiate", "guest": ' + b'{"a": ' * 3000 + b"0" + b"}" * 3001)
    return out


TARGETS = [Target("control", run, seeds, lambda d, r: json_mutation(d, r, KEYS, 1 << 16), None,
                  nasty, max_len=1 << 16)]
