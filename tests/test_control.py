"""Control messages: exact round trips, and every malformed message refused."""

from __future__ import annotations

import json

import pytest

from xmig.errors import ProtocolError
from xmig.protocol.control import (
    Abort,
    Discarded,
    Final,
    Go,
    Negotiate,
    Probe,
    Probed,
    ProbeEnd,
    QemuGuest,
    QemuSpec,
    Ready,
    Refused,
    Resumed,
    SimGuest,
    SimSpec,
    decode,
    migration_of,
    new_token,
    token_matches,
)

TOKEN = "0123456789abcdef" * 2


@pytest.mark.parametrize(
    "msg",
    [
        Negotiate("m1", 3, SimGuest(SimSpec(1 << 30, workload="oltp", udp=True)), 2 << 30,
                  1 << 30, TOKEN),
        Negotiate("vm-1.b_2", 3, QemuGuest(QemuSpec(256, smp=2, append="console=ttyS0 q")),
                  0, 256 << 20, TOKEN),
        Final("m1", 3, disk_seq=17, device_state_bytes=912),
        Ready("m1", 3, {"memory": "ab", "disk": "cd"}),
        Go("m1", 3, TOKEN),
        Abort("m1", 3, "operator", TOKEN),
        Refused("", "ProtocolError", "bad"),
        Resumed("m1", 3, at=12.5),
        Discarded("m1", 3),
        Probe(seconds=2.5),
        ProbeEnd(sent_bytes=1 << 30),
        Probed(received_bytes=1 << 30),
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
        b'{"type": "probe", "seconds": 11}',  # a probe is bounded: 10 s at most
        b'{"type": "probe", "seconds": 0}',
        b'{"type": "probe-end", "sent_bytes": -1}',
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


def _negotiate(**changes: object) -> bytes:
    body: dict[str, object] = {
        "type": "negotiate", "migration": "m1", "epoch": 1, "disk_bytes": 0,
        "ram_bytes": 1 << 20, "token": TOKEN,
        "guest": {"backend": "sim", "config": {"ram_bytes": 1 << 20}, "verify": True}}
    body.update(changes)
    return json.dumps(body).encode()


@pytest.mark.parametrize("migration", [
    "../../etc/passwd", "/etc/passwd", "..", "a/b", "", ".hidden", "x" * 65, "a\x00b",
    "é", "a b", "a\nb"])
def test_an_id_that_could_be_a_path_is_refused(migration: str) -> None:
    with pytest.raises(ProtocolError, match="migration"):
        decode(_negotiate(migration=migration))


@pytest.mark.parametrize("changes", [
    {"ram_bytes": 2**50}, {"disk_bytes": 2**60}, {"ram_bytes": -1}, {"epoch": -1},
    {"epoch": 2**63}, {"ram_bytes": 1.5}, {"ram_bytes": True}, {"token": "zz"},
    {"guest": {"backend": "xen", "config": {}}},
    {"guest": {"backend": "sim", "config": {"ram_bytes": 1 << 20, "shm_dir": "/etc"}}},
    {"guest": {"backend": "sim", "config": {"ram_bytes": 1 << 20, "nice": -20}}},
    {"guest": {"backend": "sim", "config": {"ram_bytes": 1 << 20,
                                            "udp_addr": ["0.0.0.0", 53]}}},
    {"guest": {"backend": "sim", "config": {"ram_bytes": 1 << 20, "workload": "fork"}}},
    {"guest": {"backend": "qemu", "config": {"ram_mb": 1, "append": "a\nb"}}},
    {"guest": {"backend": "qemu", "config": {"ram_mb": 1, "name": "../x"}}},
    {"guest": {"backend": "qemu", "config": {"ram_mb": 1, "extra": ["-sandbox"]}}},
    {"guest": [[[[]]]]},
])
def test_out_of_range_wrong_type_and_source_chosen_host_values_are_refused(
        changes: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        decode(_negotiate(**changes))


@pytest.mark.parametrize("raw", [
    b"[" * 200_000, b'{"type": "ready", "migration": "m", "epoch": 1, "digests": '
    + b"[" * 100_000 + b"]" * 100_000 + b"}", b"{" * 100_000, b"\xff\xfe", b"",
    b'{"type": "ready", "migration": "m", "epoch": 1, "digests": {'
    + b", ".join(b'"k%d": "v"' % i for i in range(17)) + b"}}",
    b'{"type": "abort", "migration": "m", "epoch": 1, "reason": "' + b"x" * 5000 + b'"}',
    b" " * (5 << 20),
])
def test_deep_huge_and_binary_input_is_a_protocol_error_and_nothing_else(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(raw)


def test_the_migration_a_bad_message_names_is_read_only_if_it_is_a_label() -> None:
    assert migration_of(b'{"type": "go", "migration": "vm1", "epoch": "x"}') == "vm1"
    assert migration_of(b'{"type": "go", "migration": "../x"}') == ""
    assert migration_of(b"[" * 200_000) == ""


def test_tokens_are_fresh_and_only_an_equal_non_empty_one_matches() -> None:
    a, b = new_token(), new_token()
    assert a != b and len(a) == 32
    assert token_matches(a, a) and not token_matches(b, a)
    assert not token_matches("", "")
    assert decode(Go("m", 1, a).encode()) == Go("m", 1, a)
