"""Check a PKI directory before anything uses it: which file is wrong, and why.

:func:`check_pki` is what :func:`~xmig.transport.tls.server_context` and
:func:`~xmig.transport.tls.client_context` run first, so an agent with a bad PKI stops before it
listens, connects or touches a guest, with a :class:`~xmig.errors.PkiError` whose ``path`` is
the file at fault and whose ``reason`` is one of:

==================  ==========================================================================
``missing``         the file (or the directory) does not exist
``unreadable``      it exists but cannot be read (permissions, a directory, ...)
``malformed``       not a PEM certificate / unencrypted PEM key / PEM CRL
``not-a-ca``        ``ca-cert.pem`` is not a CA certificate (basicConstraints CA=true)
``expired``         the certificate's notAfter (or the CRL's nextUpdate) has passed
``not-yet-valid``   its notBefore is still to come (a clock behind, or a cert made ahead)
``foreign-ca``      a host certificate (or the CRL) not signed by the CA in the directory
``wrong-usage``     a server certificate without serverAuth, a client one without clientAuth
``key-mismatch``    the key is not the one of its certificate
``revoked``         our own certificate is listed in the directory's ``ca-crl.pem``
==================  ==========================================================================

Everything here is local and pure: the time is a parameter (``now``, default: the clock).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from xmig.errors import PkiError
from xmig.transport.certs import (
    PkiPaths,
    Role,
    _is_ca,
    _signed_by,
    read_certificate,
    read_crl,
)

_USAGE = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}


def check_pki(paths: PkiPaths, role: Role = "both", now: dt.datetime | None = None) -> None:
    """Check the files an agent in ``role`` uses; raise :class:`PkiError` at the first fault.

    The CA certificate (a CA, valid now); for each side of ``role`` its certificate (valid
    now, signed by that CA, with the matching extended key usage) and its key (an unencrypted
    PEM key matching the certificate); and ``ca-crl.pem`` when present (signed by the CA, not
    past its nextUpdate, not listing our own certificate).
    """
    now = now or dt.datetime.now(dt.UTC)
    if not paths.directory.is_dir():
        raise PkiError(f"PKI directory {paths.directory} does not exist",
                       path=str(paths.directory), reason="missing")
    ca = read_certificate(paths.ca_cert)
    if not _is_ca(ca):
        raise PkiError(f"{paths.ca_cert} holds no CA certificate (basicConstraints CA=true)",
                       path=str(paths.ca_cert), reason="not-a-ca")
    _check_dates(paths.ca_cert, ca, now)
    sides: tuple[str, ...] = ("server", "client") if role == "both" else (role,)
    ours: list[tuple[Path, x509.Certificate]] = []
    for side in sides:
        cert_path, key_path = (
            (paths.server_cert, paths.server_key) if side == "server"
            else (paths.client_cert, paths.client_key)
        )
        cert = read_certificate(cert_path)
        _check_dates(cert_path, cert, now)
        if not _signed_by(cert, ca):
            raise PkiError(
                f"{cert_path} (issuer {cert.issuer.rfc4514_string()}) is not signed by the CA "
                f"in {paths.ca_cert} ({ca.subject.rfc4514_string()}): a certificate of "
                "another CA", path=str(cert_path), reason="foreign-ca")
        _check_usage(cert_path, cert, side)
        _check_key(key_path, cert_path, cert)
        ours.append((cert_path, cert))
    if paths.ca_crl.exists():
        _check_crl(paths.ca_crl, ca, ours, now)


def _when(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _check_dates(path: Path, cert: x509.Certificate, now: dt.datetime) -> None:
    if now > cert.not_valid_after_utc:
        raise PkiError(
            f"{path} expired on {_when(cert.not_valid_after_utc)} (now {_when(now)})",
            path=str(path), reason="expired")
    if now < cert.not_valid_before_utc:
        raise PkiError(
            f"{path} is not valid before {_when(cert.not_valid_before_utc)} (now {_when(now)}: "
            "is this host's clock behind?)", path=str(path), reason="not-yet-valid")


def _check_usage(path: Path, cert: x509.Certificate, side: str) -> None:
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return  # no restriction: good for any purpose
    if _USAGE[side] not in usages:
        raise PkiError(
            f"{path} is not a {side} certificate: its extended key usage lacks "
            f"{side}Auth", path=str(path), reason="wrong-usage")


def _check_key(key_path: Path, cert_path: Path, cert: x509.Certificate) -> None:
    try:
        data = key_path.read_bytes()
    except OSError as err:
        reason = "missing" if isinstance(err, FileNotFoundError) else "unreadable"
        raise PkiError(f"cannot read {key_path}: {err.strerror or err}",
                       path=str(key_path), reason=reason) from err
    try:
        key: PrivateKeyTypes = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        # TypeError: an encrypted key; checked here so OpenSSL never prompts on the tty
        raise PkiError(f"{key_path}: not an unencrypted PEM private key: {err}",
                       path=str(key_path), reason="malformed") from err
    if key.public_key() != cert.public_key():
        raise PkiError(f"{key_path} is not the key of {cert_path} (their public keys differ)",
                       path=str(key_path), reason="key-mismatch")


def _check_crl(
    path: Path, ca: x509.Certificate, ours: list[tuple[Path, x509.Certificate]],
    now: dt.datetime,
) -> None:
    crl = read_crl(path)
    public = ca.public_key()
    try:
        signed = crl.issuer == ca.subject and crl.is_signature_valid(public)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        signed = False
    if not signed:
        raise PkiError(f"{path} is not signed by the CA in the same directory",
                       path=str(path), reason="foreign-ca")
    if crl.next_update_utc is not None and now > crl.next_update_utc:
        raise PkiError(
            f"{path} expired on {_when(crl.next_update_utc)} (its nextUpdate): every peer "
            "would be refused; write a new one (xmig certs revoke)", path=str(path),
            reason="expired")
    for cert_path, cert in ours:
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if entry is not None:
            raise PkiError(
                f"{cert_path} is revoked: {path} lists its serial {cert.serial_number:#x} "
                f"since {_when(entry.revocation_date_utc)}", path=str(cert_path),
                reason="revoked")

