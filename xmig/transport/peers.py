"""Who may open sessions on a listening agent, and how many. Sans-IO.

A connecting peer is known by its certificate (:class:`PeerIdentity`: the SHA-256 of its DER,
its subject and its subjectAltNames). A :class:`PeerPolicy` says which identities a listener
takes and how much each may hold at once:

* ``allow``: glob patterns (:func:`fnmatch.fnmatchcase`, like libvirt's
  ``tls_allowed_dn_list``) matched against the certificate's subject DN, as an RFC 4514 string
  the way ``cryptography`` writes it and ``xmig certs show`` prints it (most specific RDN
  first: ``CN=src.example.net,O=Example``), and against each of its SAN entries (DNS names,
  case-insensitively, and IP addresses: ``*.example.net``, ``10.1.2.*``). A certificate
  matching any pattern is allowed. No pattern (the default) allows every certificate the CA
  signed: the CA's whole tree.
* ``max_sessions`` per certificate: sessions open at once. Default 8: a migration and the
  settle sessions that may follow it, or a few migrations at once from one source host. Each
  session may hold its receive windows full (about 370 MiB with the default channels), so
  this also bounds what one peer can make the agent buffer.
* ``max_connections`` per certificate: connections attached to its sessions at once.
  Default 64: a source opens a few parallel streams per session (2 by default, 4 at most in
  practice), and after a cut the agent keeps the dead one until its idle timeout while the
  new one arrives: 8 sessions x 4 streams x 2.
* ``max_handshakes`` per source IP address: connections accepted and not yet past their HELLO
  (TCP and TLS handshakes, before any identity is known). Default 64: a resuming stream runs
  up to 8 overlapping attempts (:mod:`xmig.transport.redial`), so 2 streams x 8 attempts x 4
  sessions redialling at once. Over it, a connection is closed at once (the source's attempt
  fails and is tried again): it bounds what an unauthenticated host can tie up.

A peer over a limit is refused typed (:class:`~xmig.errors.PeerLimitExceeded` on its side, a
:class:`~xmig.errors.PeerNotAllowed` for ``allow``) and the other peers' sessions go on.

In plaintext mode (benchmarks and tests only) there is no certificate: a peer is known by its
source IP address, ``allow`` patterns are matched against that address, the limits count per
address, and a session may be resumed from any address (nothing authenticates it anyway).
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from fnmatch import fnmatchcase

from cryptography import x509

from xmig.errors import ConfigError

DEFAULT_MAX_SESSIONS = 8
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_MAX_HANDSHAKES = 64


@dataclass(frozen=True)
class PeerPolicy:
    """Which client identities a listener takes, and how much each may hold at once."""

    allow: tuple[str, ...] = ()  #: glob patterns on subject DN and SANs; () = the CA's tree
    max_sessions: int = DEFAULT_MAX_SESSIONS  #: open sessions per certificate
    max_connections: int = DEFAULT_MAX_CONNECTIONS  #: attached connections per certificate
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES  #: connections before HELLO per source IP

    def __post_init__(self) -> None:
        if isinstance(self.allow, str):
            raise ConfigError(f"allow must be a sequence of patterns, not the string "
                              f"{self.allow!r}")
        object.__setattr__(self, "allow", tuple(self.allow))
        for pattern in self.allow:
            if not isinstance(pattern, str) or not pattern.strip():
                raise ConfigError(f"an --allow pattern must be a non-empty string, "
                                  f"not {pattern!r}")
        for name in ("max_sessions", "max_connections", "max_handshakes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a whole number of at least 1, not {value!r}")

    def allowed_by(self, identity: PeerIdentity) -> str | None:
        """The pattern that lets ``identity`` in (``"*"`` with no patterns), or None."""
        if not self.allow:
            return "*"
        for pattern in self.allow:
            if identity.subject and fnmatchcase(identity.subject, pattern):
                return pattern
            if any(fnmatchcase(name, pattern.lower()) for name in identity.names):
                return pattern
        return None


@dataclass(frozen=True)
class PeerIdentity:
    """Who is at the other end of a connection, as far as the server can tell."""

    key: str  #: what limits and session ownership compare: ``sha256:<hex>`` or ``address:<ip>``
    subject: str  #: the certificate's subject, RFC 4514 (``""`` in plaintext)
    names: tuple[str, ...]  #: its SAN DNS names (lower case) and IP addresses; the address
    address: str  #: the source IP address of the connection
    authenticated: bool  #: known by a verified certificate (TLS), not only by its address

    @classmethod
    def of_certificate(cls, der: bytes, address: str) -> PeerIdentity:
        """The identity of the verified certificate ``der`` (DER bytes)."""
        cert = x509.load_der_x509_certificate(der)
        return cls(
            key=f"sha256:{hashlib.sha256(der).hexdigest()}",
            subject=cert.subject.rfc4514_string(),
            names=tuple(_san_names(cert)),
            address=address,
            authenticated=True,
        )

    @classmethod
    def of_address(cls, address: str) -> PeerIdentity:
        """A plaintext peer: only its address is known."""
        return cls(key=f"address:{address}", subject="", names=(address,), address=address,
                   authenticated=False)

    def __str__(self) -> str:
        if not self.authenticated:
            return f"{self.address} (plaintext, no certificate)"
        names = f" [{', '.join(self.names)}]" if self.names else ""
        who = self.subject or "(empty subject)"
        return f"{who}{names} ({self.key[:23]}..., from {self.address})"


def _san_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names = [name.lower() for name in san.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return names


def source_address(peername: object) -> str:
    """The IP address of a socket's ``peername`` (``""`` if there is none)."""
    if isinstance(peername, tuple) and peername:
        host = str(peername[0])
        try:
            return str(ipaddress.ip_address(host.split("%")[0]))
        except ValueError:
            return host
    return ""


class HandshakeCounter:
    """Connections per source address that are not yet past their HELLO."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def begin(self, address: str) -> bool:
        """Count one more from ``address``; False (and nothing counted) if over the limit."""
        held = self._open.get(address, 0)
        if held >= self.limit:
            return False
        self._open[address] = held + 1
        return True

    def end(self, address: str) -> None:
        held = self._open.get(address, 0) - 1
        if held > 0:
            self._open[address] = held
        else:
            self._open.pop(address, None)

    def held(self, address: str) -> int:
        return self._open.get(address, 0)
