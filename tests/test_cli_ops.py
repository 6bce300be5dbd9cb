"""``xmig guest``/``migrate``/``agent`` on bad input (nothing changes, the guest runs on),
the control protocol's validation, and the progress view and report helpers."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.opsproc import Proc, is_ready, spawn, status, xmig
from xmig import hostctl
from xmig.cli import main
from xmig.cli_view import ProgressView, summary
from xmig.errors import ConfigError, GuestNotFound, MigrationAborted, NotConverging
from xmig.report import aborted_report, downtime_estimate
from xmig.transport.certs import init_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_pki(tmp_path_factory.mktemp("pki"), server_names=("127.0.0.1",)).directory


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The control socket of a small running source guest, shared by this module's tests."""
    tmp = tmp_path_factory.mktemp("host")
    proc: Proc = spawn(["guest", "start", "--name", "g", "--workdir", str(tmp), "--ram", "8MiB",
                        "--disk", "8MiB", "--workload", "oltp", "--rate", "2MB/s",
                        "--disk-rate", "1MB/s", "--seed", "5", "--json"], tmp, "guest")
    try:
        yield proc.expect(is_ready("source"), 60)["ctl"]
        r = xmig("guest", "stop", "--guest", str(tmp / "g.ctl"))
        assert r.returncode == 0, r.stderr
        assert proc.wait(30) == 0
    finally:
        proc.kill()


def one_red_line(err: str, kind: str) -> None:
    line = err.strip()
    assert "\n" not in line, line
    assert line.startswith(f"xmig: {kind}:"), line


def test_unreachable_agent_is_a_typed_error_and_the_guest_runs_on(guest: str, pki: Path) -> None:
    with socket.socket() as held:  # bound, never listening: connections are refused
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        before = status(guest)["progress"]
        r = xmig("migrate", "--guest", guest, "--to", f"127.0.0.1:{port}", "--pki", str(pki),
                 "--connect-timeout", "1s")
    assert r.returncode == 3
    one_red_line(r.stderr, "PeerUnreachable")
    assert r.stdout == ""  # not a terminal, no --json: quiet
    st = status(guest)
    assert st["state"] == "running" and st["guest_state"] == "running"
    assert st["migration"] is None and st["progress"] >= before


def test_missing_or_stale_control_socket(tmp_path: Path, pki: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    nope = str(tmp_path / "nope.ctl")
    assert main(["guest", "status", "--guest", nope]) == 2
    one_red_line(capsys.readouterr().err, "GuestNotFound")
    assert main(["migrate", "--guest", nope, "--to", "127.0.0.1:7", "--pki", str(pki)]) == 2
    one_red_line(capsys.readouterr().err, "GuestNotFound")
    stale = tmp_path / "stale.ctl"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    assert main(["guest", "stop", "--guest", str(stale)]) == 2
    err = capsys.readouterr().err
    one_red_line(err, "GuestNotFound")
    assert "stale" in err


def test_bad_pki_changes_nothing(guest: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate", "--guest", guest, "--to", "127.0.0.1:7",
                 "--pki", str(tmp_path / "none")]) == 2
    one_red_line(capsys.readouterr().err, "ConfigError")
    assert status(guest)["state"] == "running"


@pytest.mark.parametrize(
    "flags",
    [
        ["--max-downtime", "banana"],
        ["--timeout", "-3s"],
        ["--streams", "0"],
        ["--bandwidth", "10MB"],  # byte units are ambiguous for a link rate
        ["--to", "no-port"],
        ["--sdps", "sometimes"],
    ],
)
def test_bad_migrate_flags_are_argparse_errors(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["migrate", "--guest", "/nonexistent.ctl", "--to", "127.0.0.1:7", "--pki", "/x"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv + flags)
    assert exit_info.value.code == 2
    assert "error: argument" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "kind"),
    [
        (["guest", "start", "--name", "a/b", "--workdir", "/nonexistent"], "ConfigError"),
        (["guest", "start", "--name", "x", "--workdir", "/nonexistent", "--ram", "100KiB"],
         "ConfigError"),
        (["agent", "--listen", "127.0.0.1:0", "--pki", "/nonexistent", "--workdir", "/tmp"],
         "ConfigError"),
    ],
)
def test_bad_host_input_is_one_red_line(argv: list[str], kind: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    one_red_line(capsys.readouterr().err, kind)


def test_agent_cannot_listen_on_a_taken_port(tmp_path: Path, pki: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["agent", "--listen", f"127.0.0.1:{port}", "--pki", str(pki),
                     "--workdir", str(tmp_path)]) == 2
    one_red_line(capsys.readouterr().err, "ConfigError")


@pytest.mark.parametrize(
    "line",
    [
        b"not json\n",
        b"[1]\n",
        b'{"op": "reboot"}\n',
        b'{"op": "status", "extra": 1}\n',
        b'{"op": "migrate", "to": "h:1"}\n',
        b'{"op": "migrate", "to": "h", "pki": "/p"}\n',
        b'{"op": "migrate", "to": "h:1", "pki": "/p", "streams": 0}\n',
        b'{"op": "migrate", "to": "h:1", "pki": "/p", "streams": true}\n',
        b'{"op": "migrate", "to": "h:1", "pki": "/p", "sdps": "maybe"}\n',
        b'{"op": "migrate", "to": "h:1", "pki": "/p", "max_downtime_s": -1}\n',
        b'{"op": "migrate", "to": "h:1", "pki": "/p", "bandwidth_bps": 1.5}\n',
        b'{"op": "migrate", "to": 7, "pki": "/p"}\n',
    ],
)
def test_bad_requests_are_config_errors(line: bytes) -> None:
    with pytest.raises(ConfigError):
        hostctl.parse_request(line)


def test_requests_and_errors_round_trip() -> None:
    req = hostctl.MigrateRequest(to="[::1]:7800", pki="/p", bandwidth_bps=10**8, streams=3)
    assert req.endpoint == ("::1", 7800)
    assert hostctl.parse_request(hostctl.encode(req.to_json())) == req
    assert isinstance(hostctl.parse_request(b'{"op": "status"}'), hostctl.StatusRequest)
    err = MigrationAborted("migration aborted")
    err.__cause__ = NotConverging("too hot")
    data = hostctl.error_dict(err)
    back = hostctl.error_from(json.loads(hostctl.encode(data)))
    assert isinstance(back, MigrationAborted) and "NotConverging: too hot" in str(back)
    assert isinstance(hostctl.error_from({"type": "GuestNotFound", "message": "x"}),
                      GuestNotFound)
    assert type(hostctl.error_from({"type": "object", "message": "x"})).__name__ == "XmigError"
    assert json.loads(hostctl.encode({"x": float("inf")})) == {"x": None}


def test_downtime_from_one_clock_or_estimated() -> None:
    same, how = downtime_estimate(last_progress=10.0, paused_at=10.01, peer_resumed_at=10.2,
                                  resumed_seen_at=10.25, srtt_s=0.1)
    assert same == pytest.approx(0.2) and how == "destination clock"
    est, how = downtime_estimate(last_progress=10.0, paused_at=10.01, peer_resumed_at=99999.0,
                                 resumed_seen_at=10.25, srtt_s=0.1)
    assert est == pytest.approx(0.2) and how.startswith("estimate")
    assert downtime_estimate(last_progress=1, paused_at=1, peer_resumed_at=0,
                             resumed_seen_at=2, srtt_s=None)[0] is None
    cause = NotConverging("slow")
    err = MigrationAborted("aborted")
    err.__cause__ = cause
    assert aborted_report(err, source_running=True, timeline=[])["error"] == \
        "NotConverging: slow"


def progress(t: float, *, applied: int, rnd: int = 0, done: bool = False,
             pages: int = 1000) -> dict[str, Any]:
    return {"event": "progress", "phase": "brownout", "t": t, "round": rnd,
            "pages_left": pages, "predicted_downtime_ms": 100.0, "throttle": 0.25,
            "dirty_rate_Bps": 5e6, "memory_rate_Bps": 10e6, "wire_ratio": 0.5,
            "disk": {"size": 100_000_000, "bulk_applied": applied, "bulk_done": done,
                     "bulk_data_bytes": applied // 2, "mirror_bytes_sent": 1000 * int(t),
                     "mirror_queued_bytes": 0},
            "session": {"wire_bytes_out": 20_000_000 * t, "delivery_rate_Bps": 2e7,
                        "connections": 2, "srtt_s": 0.02}}


def test_progress_view_rates_and_an_honest_eta() -> None:
    view = ProgressView("vm → dst:1", budget_s=0.3)
    assert view.eta_s() is None
    view.update({"event": "connecting", "to": "dst:1"})
    for i in range(5):
        view.update(progress(float(i), applied=10_000_000 * i))
    rates = view.rates()
    assert rates["wire"] == pytest.approx(20e6) and rates["bulk"] == pytest.approx(5e6)
    # disk: 60 MB left at 10 MB/s; memory round 0: 1000 pages x 0.5 / 10 MB/s; + 0.1 s
    assert view.eta_s() == pytest.approx(6.1)
    view.update(progress(5.0, applied=100_000_000, rnd=3, done=True))
    assert view.eta_s() is None  # later rounds: the planner decides
    view.update({"event": "phase", "phase": "blackout", "t": 5.1, "note": "guest paused"})
    assert "blackout" in str(view.render().columns[1]._cells[0])
    line = summary({"name": "vm", "to": "dst:1", "total_s": 3.2, "downtime_ms": 120.0,
                    "sdps_max_throttle": 0.1, "rounds": 4, "acknowledged_writes": 9,
                    "lost_acknowledged_writes": 0, "verified": True})
    assert "downtime 120 ms" in line and "verified" in line


def test_progress_view_of_a_qemu_guest_shows_its_stream() -> None:
    view = ProgressView("vm1.qmp → dst:1", budget_s=0.3)
    view.update({"event": "progress", "phase": "brownout", "t": 2.0,
                 "stream": {"sent": {"bytes": 50 << 20}}, "max_bandwidth": 12_500_000,
                 "session": {"wire_bytes_out": 52 << 20, "delivery_rate_Bps": 1.2e7}})
    cells = [str(c) for c in view.render().columns[0]._cells]
    values = [str(c) for c in view.render().columns[1]._cells]
    assert "QEMU stream" in cells and "round" not in cells
    assert "50.0 MiB sent  max-bandwidth 12.5 MB/s" in values
