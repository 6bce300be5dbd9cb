"""TLS 1.3 with mutual X.509 authentication between two agents, and its typed errors.

Both sides connect plain TCP first and then upgrade with :func:`start_tls_server` /
:func:`start_tls_client`, so that a refused certificate, a timeout or a peer that does not
speak TLS surfaces as a typed :class:`~xmig.errors.TransportError` on *both* sides before any
frame is read. (``loop.create_server(ssl=...)`` would only log the server's handshake
failures.)

One TLS 1.3 property the caller must know: the client finishes its handshake *before* the
server has judged the client's certificate. When the server refuses it, the client's
:func:`start_tls_client` still succeeds, and the refusal reaches it on its first read: the
server closes the connection, which the client sees as end-of-file or a reset (asyncio does
not flush the server's alert), so a clean EOF before the peer's first frame means "maybe
refused". Have the server speak first, and map read errors with :func:`classify_ssl_error`.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import cast

from cryptography.hazmat.primitives import serialization

from xmig.errors import (
    AuthenticationError,
    ConfigError,
    ConnectionBroken,
    IntegrityError,
    PkiError,
    TransportError,
)
from xmig.transport.certs import PkiPaths, read_certificate
from xmig.transport.pki import check_pki

# OpenSSL reason codes (spaces as underscores, upper case), matched as substrings.
_INTEGRITY_REASONS = ("BAD_RECORD_MAC", "DECRYPTION_FAILED", "DECRYPT_ERROR")
_AUTH_REASONS = (
    "UNKNOWN_CA",
    "CERTIFICATE_REQUIRED",
    "BAD_CERTIFICATE",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_REVOKED",
    "CERTIFICATE_UNKNOWN",
    "UNSUPPORTED_CERTIFICATE",
    "CERTIFICATE_VERIFY_FAILED",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE",
    "ACCESS_DENIED",
)

# How a peer hanging up in the middle of the handshake shows.
_HANGUP_ERRORS = (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, EOFError)


def server_context(pki: PkiPaths, *, check: bool = True) -> ssl.SSLContext:
    """A TLS 1.3-only server context that requires a client certificate signed by the CA.

    The directory is checked first (:func:`~xmig.transport.pki.check_pki`, role "server"):
    a :class:`~xmig.errors.PkiError` names the file at fault and why. When it holds
    ``ca-crl.pem``, a client certificate that list revokes is refused. ``check=False`` skips
    the check (only for tests that need a server with a bad certificate).
    """
    if check:
        check_pki(pki, "server")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load(ctx, pki.ca_cert, pki.server_cert, pki.server_key)
    _load_crl(ctx, pki.ca_crl)
    return ctx


def client_context(pki: PkiPaths, *, check: bool = True) -> ssl.SSLContext:
    """A TLS 1.3-only client context presenting the client certificate.

    It verifies the server against the CA (and ``ca-crl.pem`` when present) and checks its
    name: pass ``server_hostname=`` when connecting (a DNS name or an IP address, matched
    against the server's SANs). The directory is checked first, as for
    :func:`server_context` (role "client").
    """
    if check:
        check_pki(pki, "client")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    _load(ctx, pki.ca_cert, pki.client_cert, pki.client_key)
    _load_crl(ctx, pki.ca_crl)
    return ctx


# OpenSSL's X509_V_ERR_* codes for the causes an operator must be told in words.
_VERIFY_CAUSES = {
    9: "its certificate is not valid yet (made ahead of time, or a clock is behind)",
    10: "its certificate has expired (renew it, or check the clocks)",
    23: "its certificate is revoked (listed in ca-crl.pem)",
    2: "its certificate is not signed by our CA",
    18: "its certificate is self-signed, not signed by our CA",
    19: "its certificate chain ends in a CA we do not trust",
    20: "its certificate is not signed by our CA",
    21: "its certificate is not signed by our CA",
    26: "its certificate is not meant for this use (extended key usage)",
    3: "ca-crl.pem holds no revocation list of its CA",
    12: "our revocation list (ca-crl.pem) has expired: write a new one (xmig certs revoke)",
}
_NAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


def classify_ssl_error(
    err: BaseException, *, peer: str = "", server_hostname: str | None = None
) -> TransportError:
    """The typed error for a failure of a TLS connection (handshake or later).

    * certificate refused, by us (:class:`ssl.SSLCertVerificationError`: unknown CA, expired,
      not yet valid, revoked, hostname mismatch; its ``verify_message`` is kept and the cause
      said in words; for a mismatch the message says the server's certificate does not name
      ``server_hostname``, the host dialled) or by the peer (alerts such as *unknown ca*,
      *certificate required*, *bad certificate*, *certificate expired*)
      → :class:`AuthenticationError`;
    * a record that fails decryption (*bad record mac*, *decrypt error*) → :class:`IntegrityError`;
    * anything else (reset, EOF, timeout, other TLS errors such as a non-TLS peer)
      → :class:`ConnectionBroken`.

    The returned error names ``peer`` and already has ``__cause__`` set to ``err``; the idiom
    is still ``raise classify_ssl_error(err, peer=p) from err``. Never wraps cancellation:
    an ``err`` that is not an :class:`Exception` (``CancelledError``, ``KeyboardInterrupt``)
    is re-raised.
    """
    if not isinstance(err, Exception):
        raise err
    who = peer or "the peer"
    result: TransportError
    if isinstance(err, ssl.SSLCertVerificationError):
        result = AuthenticationError(_verify_failure(err, who, server_hostname))
    elif isinstance(err, ssl.SSLError) and not isinstance(err, ssl.SSLEOFError):
        key = f"{getattr(err, 'reason', None) or ''} {err}".upper().replace(" ", "_")
        reason = _reason(err)
        if any(r in key for r in _INTEGRITY_REASONS):
            result = IntegrityError(
                f"a TLS record from {who} failed authentication, bytes were altered ({reason})"
            )
        elif "PEER_DID_NOT_RETURN_A_CERTIFICATE" in key:
            result = AuthenticationError(f"{who} presented no TLS certificate ({reason})")
        elif "CERTIFICATE_VERIFY_FAILED" in key:
            result = AuthenticationError(f"refused the TLS certificate of {who} ({reason})")
        elif any(r in key for r in _AUTH_REASONS):
            result = AuthenticationError(f"{who} refused our TLS certificate ({reason})")
        else:
            result = ConnectionBroken(f"TLS with {who} failed: {reason}")
    elif isinstance(err, TimeoutError):
        result = ConnectionBroken(f"TLS with {who} timed out")
    else:
        result = ConnectionBroken(f"connection to {who} broke: {_reason(err)}")
    result.__cause__ = err
    return result


def _verify_failure(
    err: ssl.SSLCertVerificationError, who: str, server_hostname: str | None
) -> str:
    """Words for a certificate we refused: what OpenSSL said, and what it means."""
    detail = err.verify_message or _reason(err)
    code = getattr(err, "verify_code", None)
    text = f"refused the TLS certificate of {who}: {detail}"
    if code in _NAME_MISMATCH or "mismatch" in detail.lower():
        dialled = f" {server_hostname!r}" if server_hostname else ""
        return (
            f"{text}: the server's certificate does not name the host dialled{dialled} "
            "(its names are in its subjectAltName: `xmig certs show` on the server lists "
            "them; dial one of those, or reissue it with --server-name)"
        )
    cause = _VERIFY_CAUSES.get(code) if isinstance(code, int) else None
    return f"{text}: {cause}" if cause else text


async def start_tls_server(
    transport: asyncio.BaseTransport,
    protocol: asyncio.BaseProtocol,
    ctx: ssl.SSLContext,
    *,
    timeout: float,
) -> asyncio.Transport:
    """Upgrade an accepted TCP connection to TLS as the server; return the TLS transport.

    ``protocol`` must not have consumed any byte: pause reading in its ``connection_made``
    (this function resumes it). The TLS transport feeds ``protocol`` from then on, without a
    second ``connection_made``. On failure the connection is closed and a typed error is
    raised (see :func:`classify_ssl_error`; a timeout is :class:`ConnectionBroken`);
    ``protocol`` then receives no byte.
    """
    return await _start_tls(transport, protocol, ctx, server_hostname=None, timeout=timeout)


async def start_tls_client(
    transport: asyncio.BaseTransport,
    protocol: asyncio.BaseProtocol,
    ctx: ssl.SSLContext,
    *,
    server_hostname: str,
    timeout: float,
) -> asyncio.Transport:
    """Upgrade a connected TCP connection to TLS as the client; return the TLS transport.

    ``server_hostname`` is the name (or IP address) the server's certificate must carry.
    Errors as for :func:`start_tls_server`. In TLS 1.3 a refusal of *our* certificate only
    shows on the first read afterwards (see the module's docstring).
    """
    if not server_hostname:
        raise ConfigError("a TLS client needs the server's name to check its certificate")
    return await _start_tls(
        transport, protocol, ctx, server_hostname=server_hostname, timeout=timeout
    )


def peer_identity(transport: asyncio.BaseTransport) -> str:
    """The subject common name of the peer's verified certificate, for logs.

    Falls back to the certificate's first subjectAltName, then to ``""`` (no TLS, or no
    certificate).
    """
    cert = transport.get_extra_info("peercert")
    if not cert:
        return ""
    for rdn in cert.get("subject", ()):
        for attr, value in rdn:
            if attr == "commonName":
                return str(value)
    for _kind, value in cert.get("subjectAltName", ()):
        return str(value)
    return ""


def peer_address(transport: asyncio.BaseTransport) -> str:
    """``host:port`` (``[v6]:port``) of the transport's peer, or ``""`` if unknown."""
    name = transport.get_extra_info("peername")
    if isinstance(name, tuple) and len(name) >= 2:
        host, port = str(name[0]), name[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(name) if name else ""


async def _start_tls(
    transport: asyncio.BaseTransport,
    protocol: asyncio.BaseProtocol,
    ctx: ssl.SSLContext,
    *,
    server_hostname: str | None,
    timeout: float,
) -> asyncio.Transport:
    server_side = server_hostname is None
    peer = peer_address(transport)
    if server_hostname and peer:
        peer = f"{server_hostname} ({peer})"
    loop = asyncio.get_running_loop()
    try:
        # The deadline is also given to the loop: its own handshake timeout (60 s by default)
        # would otherwise cut a longer one short with a less telling error.
        async with asyncio.timeout(timeout):
            tls = await loop.start_tls(
                cast(asyncio.WriteTransport, transport),  # uvloop's are not subclasses
                protocol,
                ctx,
                server_side=server_side,
                server_hostname=server_hostname,
                ssl_handshake_timeout=timeout,
            )
    except TimeoutError as err:
        transport.close()
        side = "server" if server_side else "client"
        raise ConnectionBroken(
            f"TLS handshake ({side} side) with {peer or 'the peer'} "
            f"did not finish within {timeout:g} s"
        ) from err
    except (OSError, EOFError) as err:
        transport.close()
        if isinstance(err, _HANGUP_ERRORS):
            raise ConnectionBroken(
                f"{peer or 'the peer'} closed the connection during the TLS handshake "
                f"({_reason(err)}; did it refuse our certificate?)"
            ) from err
        raise classify_ssl_error(err, peer=peer, server_hostname=server_hostname) from err
    if tls is None:  # the loop closed the connection under us
        raise ConnectionBroken(f"connection to {peer or 'the peer'} closed during TLS handshake")
    return tls


def _load(ctx: ssl.SSLContext, ca_cert: Path, cert: Path, key: Path) -> None:
    """Load the CA and our certificate pair, naming the file at fault in any error."""
    read_certificate(ca_cert)
    try:
        ctx.load_verify_locations(cafile=ca_cert)
    except OSError as err:
        raise ConfigError(f"cannot load the CA certificate {ca_cert}: {_reason(err)}") from err
    if ctx.cert_store_stats().get("x509_ca", 0) == 0:
        raise ConfigError(f"{ca_cert} holds no CA certificate (basicConstraints CA=true)")
    read_certificate(cert)
    try:
        data = key.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {key}: {err.strerror or err}") from err
    try:
        serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        # TypeError: an encrypted key. Checked here so OpenSSL never prompts on the tty.
        raise ConfigError(f"{key}: not an unencrypted PEM private key: {err}") from err
    try:
        ctx.load_cert_chain(certfile=cert, keyfile=key)
    except OSError as err:
        raise ConfigError(f"cannot use {cert} with {key}: {_reason(err)}") from err


def _load_crl(ctx: ssl.SSLContext, crl: Path) -> None:
    """Check the peer's certificate against ``crl`` if that file exists (QEMU's habit)."""
    if not crl.exists():
        return
    try:
        ctx.load_verify_locations(cafile=crl)
    except (OSError, ValueError) as err:
        raise PkiError(f"cannot load the revocation list {crl}: {_reason(err)}",
                       path=str(crl), reason="malformed") from err
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def _reason(err: BaseException) -> str:
    """A short human text for ``err``."""
    if isinstance(err, ssl.SSLError):
        text = str(err.args[1]) if len(err.args) > 1 else str(err)
        return text.split(" (_ssl.c")[0]
    if isinstance(err, OSError) and err.strerror:
        return f"{type(err).__name__}: {err.strerror}"
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
