"""Control messages: exact round trips, and every malformed message refused."""

from __future__ import annotations

import json

import pytest

from xmig.control import Abort, Final, Go, Negotiate, Ready, Refused, Resumed, decode
from xmig.errors import ProtocolError


@pytest.mark.parametrize(
    "msg",
    [
        Negotiate("m1", 3, {"backend": "sim", "workload": "oltp"}, 2 << 30, 1 << 30),
        Final("m1", 3, disk_seq=17, device_state_bytes=912),
        Ready("m1", 3, {"memory": "ab", "disk": "cd"}),
        Go("m1", 3),
        Abort("m1", 3, "operator"),
        Resumed("m1", 3, at=12.5),
    ],
)
def test_round_trip(msg: object) -> None:
    assert decode(msg.encode()) == msg  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b'{"migration": "m"}',
        b'{"type": "launch", "migration": "m"}',
        json.dumps({"type": "go", "migration": "m"}).encode(),  # epoch missing
        json.dumps({"type": "go", "migration": "m", "epoch": "3"}).encode(),  # wrong type
        json.dumps({"type": "go", "migration": "m", "epoch": 3, "extra": 1}).encode(),
    ],
)
def test_malformed_is_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(raw)


def test_a_refusal_becomes_the_typed_error_it_names_and_nothing_else() -> None:
    from xmig.errors import DiskTooSmall, MigrationError, QemuCapabilityError

    def err(name: str) -> Exception:
        return Refused("m", name, "why").as_error()

    assert type(err("DiskTooSmall")) is DiskTooSmall
    assert type(err("QemuCapabilityError")) is QemuCapabilityError
    assert "destination refused: why" in str(err("DiskTooSmall"))
    # unknown names, non-errors, and errors whose constructors want context: MigrationError
    for name in ("NoSuchError", "Path", "StaleEpochError", "InDoubt", "__class__"):
        assert type(err(name)) is MigrationError
