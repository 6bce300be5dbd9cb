"""A PKI is checked before anything uses it, a CRL is honoured, refusals say why.

``check_pki`` (run by ``server_context``/``client_context``) names the file at fault and why;
``revoke`` writes QEMU's ``ca-crl.pem``, which both sides then check the peer's certificate
against over real TLS; the client says in words when the server's certificate does not name
the host dialled, has expired or is not valid yet.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.transport.conftest import utc_now
from xmig.cli import main
from xmig.errors import AuthenticationError, ConfigError, PkiError
from xmig.transport import Channel, connect, listen
from xmig.transport.certs import (
    Issued,
    PkiPaths,
    init_pki,
    issue,
    make_ca,
    read_crl,
    revoke,
)
from xmig.transport.pki import check_pki
from xmig.transport.tls import client_context, server_context

DAY = dt.timedelta(days=1)


def _reissue(
    pki: PkiPaths, ca: Issued, prefix: str, *, start: dt.datetime, end: dt.datetime,
    names: tuple[str, ...] = ("localhost", "127.0.0.1"), server: bool | None = None,
) -> Issued:
    server = prefix == "server" if server is None else server
    issued = issue(ca, "localhost" if server else "xmig-client", names=names if server else (),
                   server=server, not_before=start, not_after=end)
    issued.write(pki.directory, prefix)
    return issued


def _fails(pki: PkiPaths, role: str, reason: str, path: Path, *,
           now: dt.datetime | None = None) -> PkiError:
    with pytest.raises(PkiError) as info:
        check_pki(pki, role, now)  # type: ignore[arg-type]
    err = info.value
    assert (err.reason, err.path) == (reason, str(path)), err
    assert str(path) in str(err)
    return err


# -- check_pki: which file, and why --------------------------------------------------------


def test_a_good_pki_passes_for_every_role(pki: PkiPaths) -> None:
    for role in ("server", "client", "both"):
        check_pki(pki, role)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["ca-cert.pem", "server-cert.pem", "server-key.pem"])
def test_missing_file(pki: PkiPaths, name: str) -> None:
    (pki.directory / name).unlink()
    err = _fails(pki, "server", "missing", pki.directory / name)
    assert isinstance(err, ConfigError) and isinstance(err.__cause__, FileNotFoundError)
    if name != "ca-cert.pem":
        check_pki(pki, "client")  # the client needs neither server file


def test_unreadable_and_malformed_files(pki: PkiPaths) -> None:
    pki.client_key.unlink()
    pki.client_key.mkdir()  # unreadable even by root
    _fails(pki, "client", "unreadable", pki.client_key)
    pki.client_key.rmdir()
    pki.client_key.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    _fails(pki, "client", "malformed", pki.client_key)
    pki.server_cert.write_text("garbage\n")
    _fails(pki, "server", "malformed", pki.server_cert)


def test_missing_directory(tmp_path: Path) -> None:
    _fails(PkiPaths.of(tmp_path / "nowhere"), "both", "missing", tmp_path / "nowhere")


def test_ca_file_holding_no_ca(pki: PkiPaths) -> None:
    shutil.copy(pki.client_cert, pki.ca_cert)
    assert "no CA certificate" in str(_fails(pki, "server", "not-a-ca", pki.ca_cert))


def test_expired_host_certificate_names_the_date(pki: PkiPaths, pki_ca: Issued) -> None:
    now = utc_now()
    old = _reissue(pki, pki_ca, "client", start=now - 10 * DAY, end=now - 2 * DAY)
    err = _fails(pki, "client", "expired", pki.client_cert)
    assert f"expired on {old.cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC" in str(err)
    check_pki(pki, "server")  # the server's files are fine
    with pytest.raises(PkiError, match=re.escape("client-cert.pem expired on")):
        client_context(pki)  # the context checks first


def test_not_yet_valid_certificate_names_the_date(pki: PkiPaths, pki_ca: Issued) -> None:
    now = utc_now()
    _reissue(pki, pki_ca, "server", start=now + 2 * DAY, end=now + 10 * DAY)
    err = _fails(pki, "server", "not-yet-valid", pki.server_cert)
    assert f"not valid before {now + 2 * DAY:%Y-%m-%d}" in str(err)
    with pytest.raises(PkiError, match="not valid before"):
        server_context(pki)


def test_expired_ca_is_named_first(pki: PkiPaths) -> None:
    later = utc_now() + 400 * DAY  # init_pki's certificates last 365 days
    err = _fails(pki, "both", "expired", pki.ca_cert, now=later)
    assert f"(now {later:%Y-%m-%d}" in str(err)


def test_certificate_of_a_foreign_ca(pki: PkiPaths) -> None:
    now = utc_now()
    other = make_ca("other CA", not_before=now - DAY, not_after=now + DAY)
    _reissue(pki, other, "server", start=now - DAY, end=now + DAY)
    err = _fails(pki, "server", "foreign-ca", pki.server_cert)
    assert "CN=other CA" in str(err) and "another CA" in str(err)
    with pytest.raises(PkiError, match="another CA"):
        server_context(pki)


def test_key_that_does_not_match(pki: PkiPaths) -> None:
    shutil.copy(pki.server_key, pki.client_key)
    err = _fails(pki, "client", "key-mismatch", pki.client_key)
    assert "is not the key of" in str(err) and str(pki.client_cert) in str(err)


def test_server_certificate_used_as_client_certificate(pki: PkiPaths) -> None:
    shutil.copy(pki.server_cert, pki.client_cert)
    shutil.copy(pki.server_key, pki.client_key)
    assert "clientAuth" in str(_fails(pki, "client", "wrong-usage", pki.client_cert))


# -- revocation ----------------------------------------------------------------------------


def test_revoke_writes_a_crl_signed_by_the_ca(pki: PkiPaths, pki_ca: Issued) -> None:
    assert not pki.ca_crl.exists()
    path = revoke(pki.directory, pki.client_cert)
    assert path == pki.ca_crl == pki.directory / "ca-crl.pem"
    crl = read_crl(path)
    assert crl.is_signature_valid(pki_ca.key.public_key())
    serial = x509.load_pem_x509_certificate(pki.client_cert.read_bytes()).serial_number
    assert [r.serial_number for r in crl] == [serial]
    assert crl.next_update_utc == pki_ca.cert.not_valid_after_utc
    # again, and another certificate: entries are kept, none doubled
    revoke(pki.directory, pki.client_cert)
    other = _reissue(pki, pki_ca, "client", start=utc_now() - DAY, end=utc_now() + DAY)
    revoke(pki.directory, pki.client_cert)
    assert sorted(r.serial_number for r in read_crl(path)) == sorted(
        [serial, other.cert.serial_number]
    )


def test_revoke_refuses_what_it_cannot_sign(pki: PkiPaths, tmp_path: Path) -> None:
    now = utc_now()
    stranger = issue(make_ca("x", not_before=now, not_after=now + DAY), "y", server=False,
                     not_before=now, not_after=now + DAY)
    cert, _ = stranger.write(tmp_path, "stranger")
    with pytest.raises(PkiError, match="not issued by the CA") as info:
        revoke(pki.directory, cert)
    assert info.value.reason == "foreign-ca"
    pki.ca_key.unlink()
    with pytest.raises(PkiError, match=re.escape("ca-key.pem")) as missing:
        revoke(pki.directory, pki.client_cert)
    assert missing.value.reason == "missing"
    assert not pki.ca_crl.exists()


def test_own_certificate_on_the_crl_is_refused_locally(pki: PkiPaths) -> None:
    revoke(pki.directory, pki.client_cert)
    err = _fails(pki, "client", "revoked", pki.client_cert)
    assert "ca-crl.pem lists its serial" in str(err)
    check_pki(pki, "server")  # the server's own certificate is not revoked


def test_expired_or_foreign_crl(pki: PkiPaths, pki_ca: Issued, tmp_path: Path) -> None:
    now = utc_now()
    stale = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki_ca.cert.subject)
        .last_update(now - 2 * DAY)
        .next_update(now - DAY)
        .sign(pki_ca.key, hashes.SHA256())
    )
    pki.ca_crl.write_bytes(stale.public_bytes(serialization.Encoding.PEM))
    err = _fails(pki, "server", "expired", pki.ca_crl)
    assert "every peer would be refused" in str(err)
    other = init_pki(tmp_path / "other")
    revoke(other.directory, other.client_cert)
    shutil.copy(other.ca_crl, pki.ca_crl)
    _fails(pki, "server", "foreign-ca", pki.ca_crl)
    pki.ca_crl.write_text("garbage\n")
    _fails(pki, "client", "malformed", pki.ca_crl)


def _without_crl(pki: PkiPaths, tmp_path: Path) -> PkiPaths:
    """A copy of ``pki`` without its CRL: a peer that has not been given the list."""
    copy = tmp_path / "peer"
    shutil.copytree(pki.directory, copy)
    (copy / "ca-crl.pem").unlink(missing_ok=True)
    return PkiPaths.of(copy)


async def test_revoked_client_is_refused_by_the_server(pki: PkiPaths, tmp_path: Path) -> None:
    src = _without_crl(pki, tmp_path)
    revoke(pki.directory, pki.client_cert)
    async with listen(tls=server_context(pki)) as lst:
        with pytest.raises(AuthenticationError, match="refused our certificate"):
            async with asyncio.timeout(10):
                async with connect("127.0.0.1", lst.port, tls=client_context(src),
                                   server_hostname="localhost"):
                    pass
        assert lst.refused and isinstance(lst.refused[0], AuthenticationError)
        assert "revoked" in str(lst.refused[0]), lst.refused
        assert not lst.sessions


async def test_revoked_server_is_refused_by_the_client(pki: PkiPaths, tmp_path: Path) -> None:
    dst = _without_crl(pki, tmp_path)
    revoke(pki.directory, pki.server_cert)
    async with listen(tls=server_context(dst)) as lst:
        with pytest.raises(AuthenticationError, match="certificate revoked") as info:
            async with asyncio.timeout(10):
                async with connect("127.0.0.1", lst.port, tls=client_context(pki),
                                   server_hostname="localhost"):
                    pass
        assert "ca-crl.pem" in str(info.value)
        assert not lst.sessions


async def test_peers_not_on_the_crl_still_connect(pki: PkiPaths, pki_ca: Issued) -> None:
    now = utc_now()
    old = issue(pki_ca, "old-client", server=False, not_before=now - DAY, not_after=now + DAY)
    old.write(pki.directory, "old")
    revoke(pki.directory, pki.directory / "old-cert.pem")
    async with listen(tls=server_context(pki)) as lst, connect(
        "127.0.0.1", lst.port, tls=client_context(pki), server_hostname="localhost"
    ) as client:
        async with asyncio.timeout(10):
            server = await lst.accept()
            await client.send(Channel.CONTROL, b"still here")
            assert await server.recv(Channel.CONTROL) == b"still here"
        assert not lst.refused


def test_cli_revoke(pki: PkiPaths, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "revoke", str(pki.directory), str(pki.client_cert)]) == 0
    out = capsys.readouterr().out
    assert "revoked CN=xmig-client" in out and "lists 1 certificate(s)" in out
    assert len(read_crl(pki.ca_crl)) == 1
    pki.ca_key.unlink()
    assert main(["certs", "revoke", str(pki.directory), str(pki.server_cert)]) == 2
    assert "ca-key.pem" in capsys.readouterr().err


# -- what the client says about the server's certificate -----------------------------------


async def _dial(pki: PkiPaths, server_tls: object, hostname: str) -> AuthenticationError:
    async with listen(tls=server_tls) as lst:  # type: ignore[arg-type]
        with pytest.raises(AuthenticationError) as info:
            async with asyncio.timeout(10):
                async with connect("127.0.0.1", lst.port, tls=client_context(pki),
                                   server_hostname=hostname):
                    pass
        assert not lst.sessions
    return info.value


async def test_server_certificate_for_another_name(pki: PkiPaths) -> None:
    err = await _dial(pki, server_context(pki), "dst.example.net")
    assert "does not name the host dialled 'dst.example.net'" in str(err)
    assert "xmig certs show" in str(err)


@pytest.mark.parametrize(("shift", "words"), [
    (-10, "its certificate has expired"),
    (+2, "its certificate is not valid yet"),
])
async def test_server_certificate_out_of_its_dates(
    pki: PkiPaths, pki_ca: Issued, shift: int, words: str
) -> None:
    now = utc_now()
    _reissue(pki, pki_ca, "server", start=now + shift * DAY, end=now + (shift + 8) * DAY)
    with pytest.raises(PkiError):
        server_context(pki)
    # a server that did not check (or whose certificate expired while it ran)
    err = await _dial(pki, server_context(pki, check=False), "localhost")
    assert words in str(err), err
    assert re.search("localhost", str(err))
