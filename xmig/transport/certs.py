"""X.509 certificates for the agents' mutually authenticated TLS.

The files use the names QEMU's ``tls-creds-x509`` object (and libvirt's QEMU driver) expect in
one directory, so xmig can be pointed at an existing QEMU/libvirt PKI directory::

    ca-cert.pem      the CA that signs both sides (every agent trusts it)
    ca-key.pem       its key, kept so more certificates can be issued later
    server-cert.pem  server-key.pem   the listening agent (EKU serverAuth, SANs = its names)
    client-cert.pem  client-key.pem   the connecting agent (EKU clientAuth)
    ca-crl.pem       optional: certificates the CA revoked (:func:`revoke`); when present,
                     both sides refuse a peer whose certificate it lists

Keys are ECDSA P-256, written PKCS#8 PEM, mode 0600. Certificate extensions follow what QEMU
checks when it loads credentials: the CA has ``basicConstraints CA=true`` and ``keyCertSign``;
end-entity certificates have ``CA=false`` and the matching extended key usage.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from xmig.errors import ConfigError, PkiError

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
CA_CRL = "ca-crl.pem"

DEFAULT_SERVER_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
DEFAULT_CLIENT_NAME = "xmig-client"

#: How far back ``init_pki`` dates ``notBefore``, so a peer whose clock is a little behind
#: accepts a certificate made a moment ago.
CLOCK_SKEW = dt.timedelta(minutes=5)

Role = Literal["server", "client", "both"]


@dataclass(frozen=True)
class Issued:
    """A certificate together with its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def write(self, directory: Path, prefix: str) -> tuple[Path, Path]:
        """Write ``{prefix}-cert.pem`` and ``{prefix}-key.pem`` (0600) into ``directory``.

        Existing files are replaced atomically. Returns ``(cert_path, key_path)``.
        """
        cert_path = directory / f"{prefix}-cert.pem"
        key_path = directory / f"{prefix}-key.pem"
        key_pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_atomic(key_path, key_pem, 0o600)
        _write_atomic(cert_path, self.cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return cert_path, key_path

    @classmethod
    def load(cls, directory: Path, prefix: str) -> Issued:
        """Read ``{prefix}-cert.pem`` and ``{prefix}-key.pem`` from ``directory``."""
        cert = read_certificate(directory / f"{prefix}-cert.pem")
        key_path = directory / f"{prefix}-key.pem"
        data = _read(key_path)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as err:
            raise PkiError(f"{key_path}: not an unencrypted PEM private key: {err}",
                           path=str(key_path), reason="malformed") from err
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{key_path}: expected an ECDSA key, found {type(key).__name__}",
                           path=str(key_path), reason="malformed")
        if key.public_key() != cert.public_key():
            raise PkiError(f"{key_path} does not match {directory / f'{prefix}-cert.pem'}",
                           path=str(key_path), reason="key-mismatch")
        return cls(cert=cert, key=key)


@dataclass(frozen=True)
class PkiPaths:
    """Where the CA, server and client files of one PKI directory are."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def of(cls, directory: Path) -> PkiPaths:
        """The paths in ``directory`` under QEMU's file names, without checking them."""
        return cls(
            directory=directory,
            ca_cert=directory / CA_CERT,
            ca_key=directory / CA_KEY,
            server_cert=directory / SERVER_CERT,
            server_key=directory / SERVER_KEY,
            client_cert=directory / CLIENT_CERT,
            client_key=directory / CLIENT_KEY,
        )

    @classmethod
    def in_dir(cls, directory: Path, *, role: Role = "both") -> PkiPaths:
        """The paths in ``directory``, after checking the files ``role`` needs are readable.

        A server needs the CA certificate and the server pair, a client the CA certificate
        and the client pair; ``ca-key.pem`` is never needed. Raises :class:`ConfigError`
        naming the first missing or unreadable file.
        """
        paths = cls.of(Path(directory))
        if not paths.directory.is_dir():
            raise PkiError(f"PKI directory {paths.directory} does not exist",
                           path=str(paths.directory), reason="missing")
        for path in paths.needed(role):
            try:
                with path.open("rb"):
                    pass
            except OSError as err:
                raise _unreadable(path, err) from err
        return paths

    @property
    def ca_crl(self) -> Path:
        """The CA's revocation list (optional; QEMU's name for it)."""
        return self.directory / CA_CRL

    def needed(self, role: Role = "both") -> tuple[Path, ...]:
        """The files an agent in ``role`` reads."""
        server = (self.server_cert, self.server_key) if role in ("server", "both") else ()
        client = (self.client_cert, self.client_key) if role in ("client", "both") else ()
        return (self.ca_cert, *server, *client)

    def all_files(self) -> tuple[Path, ...]:
        """All six files, CA first."""
        return (
            self.ca_cert,
            self.ca_key,
            self.server_cert,
            self.server_key,
            self.client_cert,
            self.client_key,
        )


def make_ca(common_name: str, *, not_before: dt.datetime, not_after: dt.datetime) -> Issued:
    """A self-signed CA certificate (``CA=true``, ``keyCertSign``, ``cRLSign``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        _builder(name, name, key.public_key(), not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(digital_signature=False, cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return Issued(cert=cert, key=key)


def issue(
    ca: Issued,
    common_name: str,
    *,
    names: Sequence[str] = (),
    server: bool,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> Issued:
    """A certificate signed by ``ca`` for a server (EKU serverAuth) or a client (clientAuth).

    ``names`` become subjectAltName entries: IP addresses as ``IPAddress``, anything else as
    ``DNSName``. A server certificate without ``names`` gets its common name as its only SAN.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    sans = list(names) or ([common_name] if server else [])
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        _builder(_name(common_name), ca.cert.subject, key.public_key(), not_before, not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # Not critical: RFC 5480 forbids keyEncipherment on EC keys, and QEMU only insists
        # on it when keyUsage is critical.
        .add_extension(_key_usage(digital_signature=True, cert_sign=False), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
        )
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in sans]), critical=False
        )
    return Issued(cert=builder.sign(ca.key, hashes.SHA256()), key=key)


def init_pki(
    directory: Path,
    *,
    server_names: Sequence[str] = DEFAULT_SERVER_NAMES,
    client_name: str = DEFAULT_CLIENT_NAME,
    days: int = 365,
    force: bool = False,
) -> PkiPaths:
    """Create a CA and a server and a client certificate in ``directory``.

    The server certificate's common name is the first of ``server_names`` and all of them are
    its SANs. Without ``force`` no existing file is overwritten: :class:`ConfigError` names
    the first file in the way and nothing is written.
    """
    directory = Path(directory)
    if days < 1:
        raise ConfigError(f"certificate lifetime must be at least one day, not {days}")
    if not server_names or not all(n.strip() for n in server_names):
        raise ConfigError("at least one non-empty server name is needed")
    if not client_name.strip():
        raise ConfigError("the client name must not be empty")
    for name in server_names:
        _general_name(name)  # a bad name fails before anything is created
    paths = PkiPaths.of(directory)
    existing = [p for p in paths.all_files() if p.exists() or p.is_symlink()]
    if existing and not force:
        more = f" and {len(existing) - 1} more file(s)" if len(existing) > 1 else ""
        raise ConfigError(f"refusing to overwrite {existing[0]}{more} (use --force to replace)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create {directory}: {err.strerror or err}") from err
    now = dt.datetime.now(dt.UTC)
    not_before = now - CLOCK_SKEW
    not_after = now + dt.timedelta(days=days)
    ca = make_ca("xmig CA", not_before=not_before, not_after=not_after)
    server = issue(
        ca,
        server_names[0],
        names=server_names,
        server=True,
        not_before=not_before,
        not_after=not_after,
    )
    client = issue(ca, client_name, server=False, not_before=not_before, not_after=not_after)
    try:
        ca.write(directory, "ca")
        server.write(directory, "server")
        client.write(directory, "client")
    except OSError as err:
        raise ConfigError(f"cannot write into {directory}: {err}") from err
    return paths


def read_certificate(path: Path) -> x509.Certificate:
    """Parse one PEM certificate; :class:`PkiError` naming ``path`` if that fails."""
    data = _read(path)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as err:
        raise PkiError(f"{path}: not a PEM certificate: {err}", path=str(path),
                       reason="malformed") from err


def read_crl(path: Path) -> x509.CertificateRevocationList:
    """Parse one PEM revocation list; :class:`PkiError` naming ``path`` if that fails."""
    data = _read(path)
    try:
        return x509.load_pem_x509_crl(data)
    except ValueError as err:
        raise PkiError(f"{path}: not a PEM certificate revocation list: {err}",
                       path=str(path), reason="malformed") from err


def revoke(pki_dir: Path, cert_path: Path, *, now: dt.datetime | None = None) -> Path:
    """Add the certificate at ``cert_path`` to ``pki_dir``'s ``ca-crl.pem`` (created if
    missing), signed by the CA key in ``pki_dir``; return the CRL's path.

    Entries already in the list are kept; revoking a certificate twice changes only the
    list's date. The list is valid until the CA itself expires (an expired list would make
    both sides refuse every peer). Agents read it when they make their TLS context: restart
    them (or have them rebuild it) to apply a new one. :class:`PkiError` if the CA key is
    missing, or the certificate was not issued by this CA.
    """
    paths = PkiPaths.of(Path(pki_dir))
    ca = Issued.load(paths.directory, "ca")
    cert = read_certificate(Path(cert_path))
    if not _signed_by(cert, ca.cert):
        raise PkiError(f"{cert_path} was not issued by the CA of {paths.directory}: "
                       "it cannot revoke it", path=str(cert_path), reason="foreign-ca")
    now = now or dt.datetime.now(dt.UTC)
    entries: dict[int, x509.RevokedCertificate] = {}
    if paths.ca_crl.exists():
        old = read_crl(paths.ca_crl)
        if not old.is_signature_valid(ca.key.public_key()):
            raise PkiError(f"{paths.ca_crl} is not signed by the CA of {paths.directory}",
                           path=str(paths.ca_crl), reason="foreign-ca")
        entries = {r.serial_number: r for r in old}
    if cert.serial_number not in entries:
        entries[cert.serial_number] = (
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(now)
            .build()
        )
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(max(ca.cert.not_valid_after_utc, now + dt.timedelta(days=1)))
    )
    for entry in entries.values():
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca.key, hashes.SHA256())
    try:
        _write_atomic(paths.ca_crl, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as err:
        raise PkiError(f"cannot write {paths.ca_crl}: {err.strerror or err}",
                       path=str(paths.ca_crl), reason="unwritable") from err
    return paths.ca_crl


@dataclass(frozen=True)
class CertInfo:
    """What an operator wants to know about one certificate."""

    path: Path
    subject: str
    issuer: str
    names: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    is_ca: bool
    usages: tuple[str, ...]
    signed_by_ca: bool | None

    def status(self, now: dt.datetime | None = None) -> str:
        """``valid``, ``not yet valid`` or ``expired`` at ``now`` (default: now)."""
        now = now or dt.datetime.now(dt.UTC)
        if now < self.not_before:
            return "not yet valid"
        if now > self.not_after:
            return "expired"
        return "valid"


def describe(path: Path, ca: x509.Certificate | None = None) -> CertInfo:
    """Read ``path`` and summarise it; ``signed_by_ca`` is None when no ``ca`` is given."""
    cert = read_certificate(path)
    return CertInfo(
        path=path,
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        names=tuple(_san_strings(cert)),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        is_ca=_is_ca(cert),
        usages=tuple(_usage_strings(cert)),
        signed_by_ca=None if ca is None else _signed_by(cert, ca),
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.CertificateBuilder:
    if not_after <= not_before:
        raise ConfigError(f"notAfter {not_after} is not later than notBefore {not_before}")
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def _name(common_name: str) -> x509.Name:
    if not common_name:
        raise ConfigError("a certificate needs a non-empty common name")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    try:
        return x509.DNSName(name)
    except ValueError as err:
        raise ConfigError(f"{name!r} is neither an IP address nor a DNS name") from err


def _key_usage(*, digital_signature: bool, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _san_strings(cert: x509.Certificate) -> Iterator[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    for name in san:
        if isinstance(name, x509.IPAddress):
            yield f"IP:{name.value}"
        elif isinstance(name, x509.DNSName):
            yield f"DNS:{name.value}"
        else:
            yield str(name.value)


def _usage_strings(cert: x509.Certificate) -> Iterator[str]:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    for oid in eku:
        yield _EKU_NAMES.get(oid, oid.dotted_string)


_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
}


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise _unreadable(path, err) from err


def _unreadable(path: Path, err: OSError) -> PkiError:
    reason = "missing" if isinstance(err, FileNotFoundError) else "unreadable"
    return PkiError(f"cannot read {path}: {err.strerror or err}", path=str(path), reason=reason)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a temporary file with ``mode`` and rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
