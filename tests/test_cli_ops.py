"""``xmig guest``/``migrate``/``agent`` on bad input (nothing changes, the guest runs on),
the control protocol's validation, and the progress view and report helpers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.opsproc import Proc, is_ready, spawn, status, xmig
from xmig.cli import main
from xmig.cli.view import ProgressView, summary
from xmig.errors import ConfigError, GuestNotFound, MigrationAborted, NotConverging, QemuError
from xmig.orchestrator.report import aborted_report, downtime_estimate
from xmig.service import hostctl
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
    """``err`` is one red line naming the error ``kind`` (a ``|`` separates the kinds that
    may be named, e.g. a PKI error: ``PkiError|ConfigError``)."""
    line = err.strip()
    assert "\n" not in line, line
    assert any(line.startswith(f"xmig: {k}:") for k in kind.split("|")), line


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
    one_red_line(capsys.readouterr().err, "PkiError|ConfigError")
    assert status(guest)["state"] == "running"


def test_an_unusable_client_key_is_bad_input_and_changes_nothing(
        guest: str, pki: Path, tmp_path: Path) -> None:
    """The host reads the PKI before it asks anything of the destination: its PkiError
    travels back and is bad input (exit 2), the guest runs on."""
    broken = tmp_path / "pki"
    shutil.copytree(pki, broken)
    (broken / "client-key.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n")
    r = xmig("migrate", "--guest", guest, "--to", "127.0.0.1:7", "--pki", str(broken))
    assert r.returncode == 2, r.stderr
    one_red_line(r.stderr, "PkiError|ConfigError")
    assert "client-key.pem" in r.stderr
    st = status(guest)
    assert st["state"] == "running" and st["migration"] is None


@pytest.mark.parametrize(
    "flags",
    [
        ["--max-downtime", "banana"],
        ["--timeout", "-3s"],
        ["--streams", "0"],
        ["--bandwidth", "10MB"],  # byte units are ambiguous for a link rate
        ["--to", "no-port"],
        ["--sdps", "sometimes"],
        ["--max-penalty", "1.5"],
        ["--max-penalty", "ten percent"],
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
         "PkiError|ConfigError"),
        (["migrate", "--guest", "/nonexistent.ctl", "--to", "127.0.0.1:7", "--pki", "/x",
          "--plan", "--plan-time", "11s"], "ConfigError"),
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
        b'{"op": "migrate", "to": "h:1", "pki": "/p", "blackout_timeout_s": 0}\n',
        b'{"op": "migrate", "to": "h:1", "pki": "/p", "plan_s": 11}\n',
        b'{"op": "migrate", "to": "h:1", "pki": "/p", "plan_s": 0}\n',
        b'{"op": "resolve", "migration": "vm1"}\n',
        b'{"op": "resolve", "migration": "vm1", "force": "maybe"}\n',
        b'{"op": "resolve", "migration": "../x", "force": "go"}\n',
        b'{"op": "resolve", "migration": 7, "force": "abort"}\n',
    ],
)
def test_bad_requests_are_config_errors(line: bytes) -> None:
    with pytest.raises(ConfigError):
        hostctl.parse_request(line)


def test_requests_and_errors_round_trip() -> None:
    req = hostctl.MigrateRequest(to="[::1]:7800", pki="/p", bandwidth_bps=10**8, streams=3,
                                 plan_s=2.5)
    assert req.endpoint == ("::1", 7800)
    assert hostctl.parse_request(hostctl.encode(req.to_json())) == req
    assert isinstance(hostctl.parse_request(b'{"op": "status"}'), hostctl.StatusRequest)
    forced = hostctl.ResolveRequest("vm1", "abort")
    assert hostctl.parse_request(hostctl.encode(forced.to_json())) == forced
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
    assert aborted_report(err, backend="sim", source_running=True, timeline=[]).error == \
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


# -- a path that is not what its flag needs: bad input, exit 2, said in words ------------


class FakeServer:
    """A Unix socket server that is not an xmig guest host nor a QEMU: ``banner`` greets
    like an SSH server, ``http`` answers a request line like a web server, ``json`` answers
    it with a JSON object of another protocol, ``close`` hangs up at once, ``silent``
    accepts and says nothing."""

    def __init__(self, path: Path, behaviour: str) -> None:
        self.path, self.behaviour = path, behaviour
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # shut down: the test is over
                return
            conn.settimeout(30)
            with contextlib.suppress(OSError):
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        if self.behaviour == "silent":
            self.held.append(conn)
            return
        with conn:
            if self.behaviour == "banner":
                conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
                while conn.recv(4096):
                    pass
            elif self.behaviour in ("http", "json"):
                conn.makefile("rb").readline()
                conn.sendall(b'{"jsonrpc": "2.0", "id": 1}\n' if self.behaviour == "json"
                             else b"HTTP/1.1 400 Bad Request\r\n\r\n")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept
        self.sock.close()
        self.thread.join(10)
        for conn in self.held:
            conn.close()


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Start a :class:`FakeServer` at ``tmp_path/d/x.sock``; its directory holds nothing else."""
    servers: list[FakeServer] = []

    def start(behaviour: str) -> Path:
        (tmp_path / "d").mkdir()
        servers.append(FakeServer(tmp_path / "d" / "x.sock", behaviour))
        return servers[-1].path

    yield start
    for server in servers:
        server.close()


def not_a_socket(tmp_path: Path, kind: str) -> Path:
    """A path of ``kind`` (missing, file, directory, stale) in a directory of its own."""
    where = tmp_path / "d"
    where.mkdir()
    path = where / "x.sock"
    if kind == "file":
        path.write_text("not a socket\n")
    elif kind == "directory":
        path.mkdir()
    elif kind == "stale":
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))  # bound, never listening: connections are refused
    return path


PATH_WORDS = {"missing": "not found: no such file or directory", "file": "is a regular file",
              "directory": "is a directory", "stale": "nothing listens at"}


@pytest.mark.parametrize("kind", sorted(PATH_WORDS))
@pytest.mark.parametrize("command", ["migrate", "status", "stop"])
def test_a_guest_path_that_is_no_socket_is_bad_input_in_words(
        kind: str, command: str, tmp_path: Path, pki: Path) -> None:
    path = not_a_socket(tmp_path, kind)
    argv = (["migrate", "--guest", str(path), "--to", "127.0.0.1:7", "--pki", str(pki)]
            if command == "migrate" else ["guest", command, "--guest", str(path)])
    r = xmig(*argv)
    assert r.returncode == 2, r.stderr
    one_red_line(r.stderr, "GuestNotFound")
    assert PATH_WORDS[kind] in r.stderr and str(path) in r.stderr
    assert "xmig guest host's control socket" in r.stderr or kind == "stale"


@pytest.mark.parametrize(
    ("behaviour", "why"),
    [("http", "it answered with something that is not xmig's control protocol"),
     ("json", "it answered with something that is not xmig's control protocol"),
     ("banner", "it answered with something that is not xmig's control protocol"),
     ("close", "")],
)
@pytest.mark.parametrize("command", ["migrate", "status"])
def test_a_socket_that_is_not_a_guest_host_is_bad_input(
        behaviour: str, why: str, command: str, fake: Callable[[str], Path],
        pki: Path) -> None:
    path = fake(behaviour)
    argv = (["migrate", "--guest", str(path), "--to", "127.0.0.1:7", "--pki", str(pki)]
            if command == "migrate" else ["guest", command, "--guest", str(path)])
    r = xmig(*argv)
    assert r.returncode == 2, r.stderr
    one_red_line(r.stderr, "GuestNotFound")
    assert f"{path} is not an xmig guest host's control socket ({why}" in r.stderr
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.sock"]


def test_a_socket_that_never_answers_is_not_taken_for_a_host(
        fake: Callable[[str], Path]) -> None:
    path = fake("silent")
    started = time.monotonic()
    with pytest.raises(GuestNotFound, match=re.escape(
            "is not an xmig guest host's control socket (it did not answer in time")):
        hostctl.request(path, "stop", probe_timeout=0.5)  # a stop goes to a host only
    assert time.monotonic() - started < 5


# -- --qemu-qmp: not a QMP socket is bad input, refused fast; nothing is created -----------


@pytest.mark.parametrize("kind", sorted(PATH_WORDS))
def test_a_qmp_path_that_is_no_socket_is_bad_input_and_creates_nothing(
        kind: str, tmp_path: Path, pki: Path) -> None:
    path = not_a_socket(tmp_path, kind)
    before = sorted(p.name for p in path.parent.iterdir())
    r = xmig("migrate", "--qemu-qmp", str(path), "--to", "127.0.0.1:7", "--pki", str(pki))
    assert r.returncode == 2, r.stderr
    one_red_line(r.stderr, "GuestNotFound")
    assert PATH_WORDS[kind] in r.stderr and str(path) in r.stderr
    assert sorted(p.name for p in path.parent.iterdir()) == before  # no xmig/ beside it


@pytest.mark.parametrize(
    ("behaviour", "why"),
    [("banner", "it answered with something that is not a QMP greeting"),
     ("close", "it closed the connection without a greeting"),
     ("http", "it did not greet within 2 s"), ("silent", "it did not greet within 2 s")],
)
def test_a_socket_that_is_not_qmp_is_bad_input_refused_fast_and_creates_nothing(
        behaviour: str, why: str, fake: Callable[[str], Path], pki: Path,
        tmp_path: Path) -> None:
    path = fake(behaviour)
    r = xmig("migrate", "--qemu-qmp", str(path), "--to", "127.0.0.1:7", "--pki", str(pki))
    assert r.returncode == 2, r.stderr
    one_red_line(r.stderr, "QemuError")
    assert f"{path} is not a QEMU QMP socket: {why}" in r.stderr
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.sock"]  # no xmig/ beside it
    r = xmig("migrate", "--qemu-qmp", str(path), "--to", "127.0.0.1:7", "--pki", str(pki),
             "--workdir", str(tmp_path / "w"))
    assert r.returncode == 2 and not (tmp_path / "w").exists()


def test_a_qmp_socket_that_does_not_greet_is_refused_within_the_greeting_timeout(
        fake: Callable[[str], Path], tmp_path: Path) -> None:
    from xmig.guest.qemu.attach import GREETING_TIMEOUT_S, attach_qemu

    path = fake("silent")
    started = time.monotonic()
    with pytest.raises(QemuError, match="did not greet"):
        asyncio.run(attach_qemu(path, workdir=tmp_path / "w"))
    assert GREETING_TIMEOUT_S <= 2.0
    assert time.monotonic() - started < GREETING_TIMEOUT_S + 1.5
    assert not (tmp_path / "w").exists()


def test_the_source_workdir_is_private(tmp_path: Path) -> None:
    from xmig.service.qemusource import prepare_workdir

    fresh = tmp_path / "a" / "xmig"
    prepare_workdir(fresh)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    assert stat.S_IMODE((fresh / "journal").stat().st_mode) == 0o600
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    (old / "journal").write_text("")
    os.chmod(old, 0o755)
    os.chmod(old / "journal", 0o644)
    prepare_workdir(old)  # an existing one of ours is made private, its journal kept
    assert stat.S_IMODE(old.stat().st_mode) == 0o700
    assert stat.S_IMODE((old / "journal").stat().st_mode) == 0o600
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError):
        prepare_workdir(tmp_path / "file")


# -- the agent's limits and allow-list reach serve_agent ------------------------------------


def test_agent_limits_and_allow_patterns_are_passed_on(
        tmp_path: Path, pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import xmig.service.agentd

    seen: list[dict[str, Any]] = []

    async def fake_serve(**kwargs: Any) -> int:
        seen.append(kwargs)
        return 0

    monkeypatch.setattr(xmig.service.agentd, "serve_agent", fake_serve)
    base = ["agent", "--listen", "127.0.0.1:0", "--pki", str(pki), "--workdir", str(tmp_path)]
    assert main(base) == 0
    assert (seen[-1]["max_ram_bytes"], seen[-1]["max_disk_bytes"], seen[-1]["allow"]) == \
        (None, None, ())
    assert main([*base, "--max-ram", "4GiB", "--max-disk", "1TB", "--allow", "CN=src*",
                 "--allow", "*.example.net"]) == 0
    assert (seen[-1]["max_ram_bytes"], seen[-1]["max_disk_bytes"], seen[-1]["allow"]) == \
        (4 << 30, 10**12, ("CN=src*", "*.example.net"))


@pytest.mark.parametrize("flags", [["--max-ram", "lots"], ["--max-disk", "0"],
                                   ["--max-ram", "-1GiB"]])
def test_bad_agent_limits_are_argparse_errors(flags: list[str], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["agent", "--listen", "127.0.0.1:0", "--pki", "/x", "--workdir", str(tmp_path),
              *flags])
    assert exit_info.value.code == 2
    assert f"argument {flags[0]}" in capsys.readouterr().err


def test_an_agent_with_limits_and_an_allow_list_starts(tmp_path: Path, pki: Path) -> None:
    agent = spawn(["agent", "--listen", "127.0.0.1:0", "--pki", str(pki), "--workdir",
                   str(tmp_path / "dst"), "--max-ram", "1GiB", "--max-disk", "2GiB",
                   "--allow", "*", "--json"], tmp_path, "agent")
    try:
        assert agent.expect(is_ready("agent"), 30)["port"] > 0
        agent.popen.terminate()
        assert agent.wait(30) == 0
    finally:
        agent.kill()


def test_resolve_refuses_bad_flags_and_lists_nothing_where_nothing_is_in_doubt(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["resolve", "--workdir", str(tmp_path / "nope")]) == 2
    assert "ConfigError" in capsys.readouterr().err
    assert main(["resolve", "--workdir", str(tmp_path), "--force", "go"]) == 2
    assert "--force needs --migration" in capsys.readouterr().err
    assert main(["resolve", "--workdir", str(tmp_path), "--migration", "vm1",
                 "--force", "abort", "--yes"]) == 2
    assert "GuestNotFound: no migration vm1 is in doubt" in capsys.readouterr().err
    (tmp_path / "stale.ctl").write_text("")  # not a socket: skipped
    assert main(["resolve", "--workdir", str(tmp_path), "--json"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["resolve", "--workdir", str(tmp_path)]) == 0
    assert "no migration is in doubt here" in capsys.readouterr().out


def test_a_penalty_bound_for_a_qemu_guest_is_refused_before_anything_is_asked(
        tmp_path: Path, pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    qmp = tmp_path / "vm.qmp"
    rc = main(["migrate", "--qemu-qmp", str(qmp), "--to", "127.0.0.1:7", "--pki", str(pki),
               "--max-penalty", "0.1"])
    assert rc == 2
    err = capsys.readouterr().err
    one_red_line(err, "ConfigError")
    assert "--max-penalty" in err and not (tmp_path / "xmig").exists()
