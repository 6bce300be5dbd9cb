"""The xmig command end to end: the demo over the emulated WAN, and bad flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xmig.cli import main


@pytest.mark.root
def test_demo_json_moves_data_across_a_cut_and_verifies_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc = main(["demo", "--transport", "--json", "--size", "48MiB", "--rate", "1gbit",
               "--rtt", "10ms", "--cut-seconds", "1.5"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    result = lines[-1]
    assert rc == 0
    assert result["verified"] is True
    assert result["bytes"] == 48 << 20
    assert result["approximate_link"] is False
    assert result["reconnects"] >= 1  # the cut outlived the idle timeout: it resumed
    assert any(p.get("event") == "progress" and p["link_cut"] for p in lines[:-1])


@pytest.mark.root
def test_demo_migrates_the_reference_guest(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    rc = main(["demo", "--json", "--ram", "64MiB", "--disk", "32MiB", "--rate", "1gbit",
               "--rtt", "10ms", "--dirty-rate", "10MB/s", "--disk-rate", "2MB/s",
               "--plot", str(tmp_path / "t.png"), "--report", str(tmp_path / "r.json")])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    report = lines[-1]
    assert rc == 0
    assert report["status"] == "done" and report["verified"] is True
    assert report["lost_acknowledged_writes"] == 0 and report["acknowledged_writes"] > 0
    assert any(e.get("event") == "progress" for e in lines[:-1])
    assert json.loads((tmp_path / "r.json").read_text())["timeline"] == report["timeline"]
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--rate", "10furlongs"],
        ["demo", "--streams", "0"],
        ["demo", "--transport", "--size", "12"],
        ["demo", "--ram", "lots"],
        ["demo", "--rtt", "soon"],
        ["demo", "--dirty-rate", "20 furlongs/s"],
        ["demo", "--rate", "60MB"],  # a size, not a rate
        ["demo", "--loss", "150%"],
        ["demo", "--transport", "--cut-seconds", "-1"],
        ["netem", "set", "--queue", "huge"],
    ],
)
def test_bad_flags_are_one_red_line_and_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("xmig: ConfigError:")
    assert "\n" not in err
    flag = next((a for a in argv if a.startswith("--") and a != "--transport"), "")
    if flag != "--streams" and flag != "--size":
        assert f"{flag}: " in err and repr(argv[-1]) in err  # which flag, what was given


@pytest.mark.root
@pytest.mark.qemu
def test_demo_migrates_a_qemu_guest(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.guest.qemu.helpers import guest_build_dir

    monkeypatch.setenv("XMIG_GUEST_BUILD", str(guest_build_dir()))
    rc = main(["demo", "--guest", "qemu", "--json", "--ram", "128MiB", "--disk", "16MiB",
               "--rate", "1gbit", "--rtt", "10ms", "--report", str(tmp_path / "r.json")])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    report = lines[-1]
    assert rc == 0
    assert report["status"] == "done" and report["verified"] is True
    assert report["counter"]["destination_first"] >= report["counter"]["source_last"] > 0
    assert report["disk_records_checked"] > 0
    assert 0 < report["downtime_ms"] < 5000 and report["wire_bytes"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "done"
    # the forecast leads the report: the QEMU guest measured, the emulated link's rate
    assert next(iter(report)) == "forecast" and report["forecast"]["link_Bps"] == 125e6
    assert report["forecast"]["guest"]["ram_bytes"] == 128 << 20
    # the mirror job's own copy is counted apart from the guest's writes that follow
    assert {"copy_ack_delay_max_s", "ack_delay_max_s"} <= set(report["disk"])
