"""The test PKI: files, extensions QEMU checks, refusals, and the ``xmig certs`` commands."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import re
import stat
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.transport.conftest import TlsLink, utc_now
from xmig.cli import main
from xmig.errors import ConfigError
from xmig.transport.certs import (
    Issued,
    PkiPaths,
    describe,
    init_pki,
    issue,
    make_ca,
    read_certificate,
)
from xmig.transport.tls import client_context, peer_identity, server_context

E = TypeVar("E", bound=x509.ExtensionType)

FILES = {
    "ca-cert.pem": 0o644,
    "ca-key.pem": 0o600,
    "server-cert.pem": 0o644,
    "server-key.pem": 0o600,
    "client-cert.pem": 0o644,
    "client-key.pem": 0o600,
}


def _snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in directory.iterdir()}


def _ext(cert: x509.Certificate, kind: type[E]) -> E:
    return cert.extensions.get_extension_for_class(kind).value


def _critical(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> bool:
    return cert.extensions.get_extension_for_class(kind).critical


# -- init_pki ------------------------------------------------------------------------------


def test_init_pki_writes_qemu_file_names_with_key_modes(tmp_path: Path) -> None:
    paths = init_pki(tmp_path / "new" / "pki")
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths.directory.iterdir()} == FILES
    assert paths == PkiPaths.in_dir(tmp_path / "new" / "pki")
    assert paths.all_files()[0] == paths.directory / "ca-cert.pem"


def test_ca_extensions(pki: PkiPaths) -> None:
    ca = read_certificate(pki.ca_cert)
    assert _critical(ca, x509.BasicConstraints) and _ext(ca, x509.BasicConstraints).ca
    assert _ext(ca, x509.KeyUsage).key_cert_sign
    assert ca.subject == ca.issuer
    ca.verify_directly_issued_by(ca)


@pytest.mark.parametrize(
    ("prefix", "purpose"),
    [("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)],
)
def test_host_certificates_have_the_purpose_qemu_checks(
    pki: PkiPaths, prefix: str, purpose: x509.ObjectIdentifier
) -> None:
    ca = read_certificate(pki.ca_cert)
    cert = read_certificate(pki.directory / f"{prefix}-cert.pem")
    cert.verify_directly_issued_by(ca)
    assert list(_ext(cert, x509.ExtendedKeyUsage)) == [purpose]
    assert _ext(cert, x509.BasicConstraints).ca is False
    assert _ext(cert, x509.KeyUsage).digital_signature
    key = Issued.load(pki.directory, prefix).key
    assert key.curve.name == "secp256r1"


def test_server_names_become_ip_and_dns_sans(tmp_path: Path) -> None:
    paths = init_pki(tmp_path, server_names=("dst.example", "10.0.0.2", "fd00::2"))
    cert = read_certificate(paths.server_cert)
    san = _ext(cert, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["dst.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.2"),
        ipaddress.ip_address("fd00::2"),
    ]
    assert cert.subject.rfc4514_string() == "CN=dst.example"


def test_validity_is_days_from_now_with_skew(tmp_path: Path) -> None:
    before = utc_now()
    paths = init_pki(tmp_path, days=7)
    info = describe(paths.client_cert)
    assert info.not_before < before  # backdated for peers whose clock is behind
    assert dt.timedelta(days=7) - dt.timedelta(seconds=5) <= info.not_after - before
    assert info.not_after - before <= dt.timedelta(days=7, seconds=5)
    assert info.status() == "valid"


def test_init_pki_refuses_to_overwrite_and_changes_nothing(pki: PkiPaths) -> None:
    pki.client_key.unlink()  # even a partial PKI is not touched
    before = _snapshot(pki.directory)
    with pytest.raises(ConfigError, match=re.escape(str(pki.ca_cert))):
        init_pki(pki.directory)
    assert _snapshot(pki.directory) == before


def test_init_pki_force_replaces_everything(pki: PkiPaths) -> None:
    before = _snapshot(pki.directory)
    init_pki(pki.directory, force=True)
    after = _snapshot(pki.directory)
    assert set(after) == set(FILES)
    assert all(after[name][1] != before[name][1] for name in before)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"days": 0}, "at least one day"),
        ({"server_names": ()}, "server name"),
        ({"client_name": " "}, "client name"),
        ({"server_names": ("bücher.example",)}, "neither an IP address nor a DNS name"),
    ],
)
def test_init_pki_rejects_bad_arguments(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        init_pki(tmp_path / "pki", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "pki").exists()


# -- PkiPaths.in_dir -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ca-cert.pem", "server-key.pem", "client-cert.pem"])
def test_in_dir_names_a_missing_file(pki: PkiPaths, name: str) -> None:
    (pki.directory / name).unlink()
    with pytest.raises(ConfigError, match=re.escape(str(pki.directory / name))) as info:
        PkiPaths.in_dir(pki.directory)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_in_dir_checks_only_what_the_role_needs(pki: PkiPaths) -> None:
    pki.client_key.unlink()
    pki.ca_key.unlink()  # never needed by an agent
    assert PkiPaths.in_dir(pki.directory, role="server").server_key == pki.server_key
    with pytest.raises(ConfigError, match=re.escape("client-key.pem")):
        PkiPaths.in_dir(pki.directory, role="client")


def test_in_dir_of_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        PkiPaths.in_dir(tmp_path / "nowhere")


def test_in_dir_names_an_unreadable_file(pki: PkiPaths) -> None:
    pki.server_cert.unlink()
    pki.server_cert.mkdir()  # a directory cannot be read as a file, even by root
    with pytest.raises(ConfigError, match=re.escape(str(pki.server_cert))):
        PkiPaths.in_dir(pki.directory)


# -- Issued --------------------------------------------------------------------------------


def test_issue_and_load_round_trip(pki_ca: Issued, tmp_path: Path) -> None:
    now = utc_now()
    issued = issue(
        pki_ca, "dst", server=True, not_before=now, not_after=now + dt.timedelta(hours=1)
    )
    cert_path, key_path = issued.write(tmp_path, "extra")
    assert (cert_path.name, key_path.name) == ("extra-cert.pem", "extra-key.pem")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    loaded = Issued.load(tmp_path, "extra")
    assert loaded.cert == issued.cert
    assert describe(cert_path).names == ("DNS:dst",)  # a server gets its CN as SAN
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_load_refuses_a_key_of_another_certificate(pki: PkiPaths) -> None:
    pki.client_key.write_bytes(pki.server_key.read_bytes())
    with pytest.raises(ConfigError, match="does not match"):
        Issued.load(pki.directory, "client")


def test_certificate_must_end_after_it_starts(pki_ca: Issued) -> None:
    now = utc_now()
    with pytest.raises(ConfigError, match="notAfter"):
        make_ca("x", not_before=now, not_after=now)


def test_read_certificate_names_a_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "ca-cert.pem"
    path.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=re.escape(str(path))) as info:
        read_certificate(path)
    assert isinstance(info.value.__cause__, ValueError)


# -- xmig certs ----------------------------------------------------------------------------


async def test_cli_init_writes_a_working_pki(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tls_link: TlsLink
) -> None:
    directory = tmp_path / "pki"
    args = ["certs", "init", str(directory), "--server-name", "127.0.0.1"]
    assert main([*args, "--client-name", "src-agent", "--days", "30"]) == 0
    out = capsys.readouterr().out
    for name, mode in FILES.items():
        assert re.search(rf"{re.escape(name)}\s+{mode:04o}", out), out
        assert stat.S_IMODE((directory / name).stat().st_mode) == mode
    pki = PkiPaths.in_dir(directory)
    async with tls_link(
        server_context(pki), client_context(pki), server_hostname="127.0.0.1"
    ) as link:
        assert not isinstance(link.server, BaseException), link.server
        assert not isinstance(link.client, BaseException), link.client
        assert peer_identity(link.server) == "src-agent"
        assert peer_identity(link.client) == "127.0.0.1"
        link.client.write(b"ok")
        async with asyncio.timeout(5):
            assert await link.server_app.read(2) == b"ok"
    assert describe(pki.client_cert).not_after - utc_now() < dt.timedelta(days=30, minutes=1)


def test_cli_init_again_fails_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "pki"
    assert main(["certs", "init", str(directory)]) == 0
    before = _snapshot(directory)
    capsys.readouterr()
    assert main(["certs", "init", str(directory), "--server-name", "other"]) == 2
    err = capsys.readouterr().err
    assert "ConfigError" in err and "--force" in err
    assert _snapshot(directory) == before
    assert main(["certs", "init", str(directory), "--force"]) == 0
    assert _snapshot(directory) != before


def test_cli_init_rejects_zero_days(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "init", str(tmp_path / "pki"), "--days", "0"]) == 2
    assert "at least one day" in capsys.readouterr().err
    assert not (tmp_path / "pki").exists()


def test_cli_show(pki: PkiPaths, capsys: pytest.CaptureFixture[str]) -> None:
    pki.client_cert.unlink()
    pki.server_key.chmod(0o644)
    assert main(["certs", "show", str(pki.directory)]) == 0
    out = capsys.readouterr().out
    server = out[out.index("server-cert.pem:") :]
    assert "CN=localhost" in server
    assert "DNS:localhost, IP:127.0.0.1, IP:::1" in server
    assert re.search(
        r"valid\s+\d{4}-\d\d-\d\d .* to \d{4}-\d\d-\d\d .*\(valid, 36\d days left\)", server
    )
    assert "serverAuth" in server
    assert re.search(r"signed by CA\s+yes", server)
    assert "0644, open to group/others!, matches" in server
    assert "client-cert.pem: missing" in out
    assert re.search(r"CA\s+yes", out[: out.index("server-cert.pem:")])


def test_cli_show_flags_a_certificate_from_another_ca(
    pki: PkiPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    now = utc_now()
    other = make_ca("other", not_before=now, not_after=now + dt.timedelta(days=1))
    issue(other, "x", server=False, not_before=now, not_after=now + dt.timedelta(days=1)).write(
        pki.directory, "client"
    )
    assert main(["certs", "show", str(pki.directory)]) == 0
    client = capsys.readouterr().out.split("client-cert.pem:")[1]
    assert re.search(r"signed by CA\s+NO", client)
    assert "CN=other" in client


def test_cli_show_of_an_empty_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "show", str(tmp_path)]) == 2
    assert "no certificate" in capsys.readouterr().err
