"""CLI commands of the transport package: ``xmig certs init``, ``show`` and ``revoke``."""

from __future__ import annotations

import argparse
import datetime as dt
import stat
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from xmig.errors import ConfigError
from xmig.transport import certs


def add_parsers(sub: Any) -> None:
    """Register this package's subcommands on the ``xmig`` parser."""
    parser = sub.add_parser(
        "certs",
        help="manage the TLS certificates agents use",
        description="Certificates for the agents' mutually authenticated TLS, in a directory "
        "laid out like QEMU's tls-creds-x509 (ca-cert.pem, server-cert.pem, server-key.pem, "
        "client-cert.pem, client-key.pem).",
    )
    commands = parser.add_subparsers(dest="certs_command", metavar="COMMAND", required=True)

    init = commands.add_parser(
        "init",
        help="create a CA, a server and a client certificate",
        description="Create a CA (ca-cert.pem, ca-key.pem), a server certificate for the "
        "given names and a client certificate in DIR. Keys are written mode 0600.",
    )
    init.add_argument("directory", metavar="DIR", type=Path)
    init.add_argument(
        "--server-name",
        dest="server_names",
        metavar="NAME",
        action="append",
        help="DNS name or IP address the server certificate is valid for; repeat for more "
        f"(default: {', '.join(certs.DEFAULT_SERVER_NAMES)}); the first is its common name",
    )
    init.add_argument(
        "--client-name",
        metavar="NAME",
        default=certs.DEFAULT_CLIENT_NAME,
        help="common name of the client certificate (default: %(default)s)",
    )
    init.add_argument(
        "--days", type=int, default=365, help="validity in days (default: %(default)s)"
    )
    init.add_argument("--force", action="store_true", help="replace existing files")
    init.set_defaults(func=_init)

    show = commands.add_parser(
        "show",
        help="print subject, names and validity of each certificate",
        description="Print subject, subjectAltNames, validity and usage of the CA, server "
        "and client certificates in DIR, and whether each is signed by the CA and matches "
        "its key.",
    )
    show.add_argument("directory", metavar="DIR", type=Path)
    show.set_defaults(func=_show)

    revoke = commands.add_parser(
        "revoke",
        help="add a certificate to the CA's revocation list (ca-crl.pem)",
        description="Add CERT to DIR/ca-crl.pem (created if missing), signed with "
        "DIR/ca-key.pem. Agents whose PKI directory holds that ca-crl.pem refuse a peer "
        "presenting CERT once they reload it (restart them). Copy the file to every agent.",
    )
    revoke.add_argument("directory", metavar="DIR", type=Path)
    revoke.add_argument("cert", metavar="CERT", type=Path, help="the certificate to revoke")
    revoke.set_defaults(func=_revoke)


def _init(args: argparse.Namespace) -> int:
    paths = certs.init_pki(
        args.directory,
        server_names=args.server_names or certs.DEFAULT_SERVER_NAMES,
        client_name=args.client_name,
        days=args.days,
        force=args.force,
    )
    print(f"wrote {paths.directory}:")
    for path in paths.all_files():
        print(f"  {path.name:<16} {stat.S_IMODE(path.stat().st_mode):04o}")
    return 0


def _show(args: argparse.Namespace) -> int:
    paths = certs.PkiPaths.of(args.directory)
    if not paths.directory.is_dir():
        raise ConfigError(f"PKI directory {paths.directory} does not exist")
    ca = certs.read_certificate(paths.ca_cert) if paths.ca_cert.exists() else None
    now = dt.datetime.now(dt.UTC)
    shown = 0
    for cert_path, key_path in (
        (paths.ca_cert, paths.ca_key),
        (paths.server_cert, paths.server_key),
        (paths.client_cert, paths.client_key),
    ):
        if not cert_path.exists():
            print(f"{cert_path.name}: missing\n")
            continue
        info = certs.describe(cert_path, ca)
        shown += 1
        print(f"{cert_path.name}:")
        for label, value in _rows(info, now, key_path):
            print(f"  {label:<12} {value}")
        print()
    if shown == 0:
        raise ConfigError(f"no certificate in {paths.directory}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    path = certs.revoke(args.directory, args.cert)
    cert = certs.read_certificate(args.cert)
    entries = len(certs.read_crl(path))
    print(f"revoked {cert.subject.rfc4514_string()} (serial {cert.serial_number:#x}): "
          f"{path} lists {entries} certificate(s)")
    return 0


def _rows(info: certs.CertInfo, now: dt.datetime, key_path: Path) -> list[tuple[str, str]]:
    left = info.not_after - now
    status = info.status(now)
    if status == "valid":
        status += f", {left.days} days left"
    signed = {None: "no ca-cert.pem", True: "yes", False: "NO"}[info.signed_by_ca]
    return [
        ("subject", info.subject),
        ("issuer", info.issuer),
        ("names", ", ".join(info.names) or "-"),
        ("valid", f"{_when(info.not_before)} to {_when(info.not_after)} ({status})"),
        ("CA", "yes" if info.is_ca else "no"),
        ("usage", ", ".join(info.usages) or "-"),
        ("signed by CA" if not info.is_ca else "self-signed", signed),
        ("key", _key_status(info.path, key_path)),
    ]


def _when(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _key_status(cert_path: Path, key_path: Path) -> str:
    """``key.pem (0600, matches)``, or what is wrong with the key."""
    if not key_path.exists():
        return f"{key_path.name} missing"
    mode = stat.S_IMODE(key_path.stat().st_mode)
    warning = ", open to group/others!" if mode & 0o077 else ""
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError, TypeError) as err:
        return f"{key_path.name} ({mode:04o}{warning}, unusable: {err})"
    matches = key.public_key() == cert.public_key()
    return f"{key_path.name} ({mode:04o}{warning}, {'matches' if matches else 'DOES NOT MATCH'})"
