"""The emulated WAN link between a src host and a dst host: :class:`Wan` and :func:`wan`.

::

    from xmig.netem import LinkSpec, Wan, parse_rate

    spec = LinkSpec.symmetric(rate_bps=parse_rate("1gbit"), rtt_s=0.1)
    with Wan(spec) as link:                      # or wan(spec, fallback="relay")
        server = link.socket("dst")              # a socket inside the dst host
        server.bind(("0.0.0.0", 7000)); server.listen()
        client = link.socket("src")
        client.connect(link.dst_endpoint(7000))  # crosses the emulated link
        link.cut(); ...; link.restore()          # a cable pull and its repair
        link.set(dataclasses.replace(link.spec, rate_bps=100_000_000))
        print(link.stats())

Two implementations behind one face:

- ``"tun"`` (root and /dev/net/tun): three network namespaces and the TUN emulator process,
  :mod:`xmig.netem.tunlink`. Real TCP end to end: slow start, loss recovery, SYNs unanswered
  during a cut. ``approximate`` is False.
- ``"relay"`` (no root needed): loopback TCP relays, :mod:`xmig.netem.relay`. Rate and delay
  only; ``approximate`` is True and a warning says so.

``fallback="auto"`` picks ``"tun"`` when it can (root and /dev/net/tun, and building it is
not refused, as it is without CAP_NET_ADMIN in a container), else ``"relay"``. Setup takes
about 0.2 s (the emulator process starting), so a sync ``with`` block is fine inside async
code too; every control call (:meth:`Wan.set`, :meth:`Wan.cut`, :meth:`Wan.restore`) returns
only after the emulator has acknowledged it. Sockets returned by :meth:`Wan.socket` keep their
host's namespace alive until they are closed; programs started with :meth:`Wan.popen` are
terminated at close.
"""

from __future__ import annotations

import os
import socket as _socket
import subprocess
import warnings
from types import TracebackType
from typing import Any, Literal, Protocol

from xmig.errors import ConfigError, NetemError, NetemPermissionError
from xmig.netem.spec import LinkSpec

Side = Literal["src", "dst"]
Fallback = Literal["auto", "tun", "relay"]


class _Link(Protocol):
    approximate: bool
    src_addr: str
    dst_addr: str
    spec: LinkSpec

    def start(self) -> None: ...
    def close(self) -> None: ...
    def socket(self, side: str, family: int, type: int) -> _socket.socket: ...
    def dst_endpoint(self, port: int) -> tuple[str, int]: ...
    def popen(self, side: str, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]: ...
    def set(self, spec: LinkSpec) -> None: ...
    def cut(self) -> None: ...
    def restore(self) -> None: ...
    def stats(self) -> dict[str, Any]: ...


def tun_available() -> bool:
    """True when the faithful emulator can run here: root and /dev/net/tun."""
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun")


class Wan:
    """One emulated link; ``with Wan(spec) as link:`` builds it and tears it down.

    ``fallback``: ``"tun"`` (faithful, needs root: NetemPermissionError otherwise),
    ``"relay"`` (approximate, anywhere) or ``"auto"``. ``name`` (TUN mode only) also mounts
    the src and dst namespaces as ``/run/netns/NAME-src`` and ``NAME-dst``.
    """

    def __init__(
        self, spec: LinkSpec, *, fallback: Fallback = "auto", name: str | None = None
    ) -> None:
        if fallback not in ("auto", "tun", "relay"):
            raise ConfigError(f"fallback must be auto, tun or relay, not {fallback!r}")
        mode = fallback
        if fallback == "auto":
            mode = "tun" if tun_available() else "relay"
        elif fallback == "tun" and not tun_available():
            raise NetemPermissionError(
                "the TUN emulator needs root and /dev/net/tun (use fallback='relay')"
            )
        if mode == "relay" and name is not None:
            raise ConfigError("named namespaces exist only in TUN mode")
        self._auto = fallback == "auto"
        self._link: _Link
        self.mode: Literal["tun", "relay"]
        if mode == "tun":
            from xmig.netem.tunlink import TunLink

            self._link = TunLink(spec, name=name)
            self.mode = "tun"
        else:
            self._use_relay(spec, "as asked" if fallback == "relay" else "no root or no TUN")
        self._running = False

    def _use_relay(self, spec: LinkSpec, reason: str) -> None:
        from xmig.netem.relay import RelayLink

        self._link = RelayLink(spec)
        self.mode = "relay"
        warnings.warn(
            f"xmig.netem: using the approximate loopback relay ({reason}): senders see a "
            "loopback RTT, so slow start and loss recovery are not emulated; loss is ignored",
            stacklevel=3,
        )

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Wan:
        """Build the link (what ``with`` does on entry). Returns self."""
        if self._running:
            raise NetemError("the link is running already")
        try:
            self._link.start()
        except NetemPermissionError as err:
            if not (self._auto and self.mode == "tun"):
                raise
            self._use_relay(self._link.spec, f"the TUN emulator was refused: {err}")
            self._link.start()
        self._running = True
        return self

    def close(self) -> None:
        """Tear the link down (what ``with`` does on exit). Idempotent."""
        self._running = False
        self._link.close()

    def __enter__(self) -> Wan:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check(self) -> _Link:
        if not self._running:
            raise NetemError("the link is not running (use `with Wan(spec) as link:`)")
        return self._link

    # -- what the link looks like --------------------------------------------------------

    @property
    def approximate(self) -> bool:
        """False for the TUN emulator, True for the loopback relay."""
        return self._link.approximate

    @property
    def src_addr(self) -> str:
        """The src host's address (what dst-side servers see as the peer)."""
        return self._link.src_addr

    @property
    def dst_addr(self) -> str:
        """The dst host's address."""
        return self._link.dst_addr

    @property
    def spec(self) -> LinkSpec:
        """The parameters in force."""
        return self._link.spec

    @property
    def link(self) -> Any:
        """The implementation (TunLink or RelayLink), for tests and diagnostics."""
        return self._link

    # -- hosts -------------------------------------------------------------------------

    def socket(
        self,
        side: Side,
        family: int = _socket.AF_INET,
        type: int = _socket.SOCK_STREAM,
    ) -> _socket.socket:
        """A socket created inside the ``side`` host; the caller binds, connects, listens."""
        return self._check().socket(side, family, type)

    def dst_endpoint(self, port: int) -> tuple[str, int]:
        """Where a src-side client connects to reach a dst-side listener on ``port``."""
        if not 0 < port < 65536:
            raise ConfigError(f"bad port {port!r}")
        return self._check().dst_endpoint(port)

    def popen(self, side: Side, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        """Run ``argv`` inside the ``side`` host (``subprocess.Popen`` keywords apply)."""
        return self._check().popen(side, argv, **kw)

    # -- link control ------------------------------------------------------------------

    def set(self, spec: LinkSpec) -> None:
        """Apply new parameters; returns once the emulator has them."""
        self._check().set(spec)

    def cut(self) -> None:
        """Pull the cable: every packet is dropped until :meth:`restore`."""
        self._check().cut()

    def restore(self) -> None:
        """Plug the cable back in."""
        self._check().restore()

    def stats(self) -> dict[str, Any]:
        """Counters per direction (``fwd`` = src → dst, ``rev``), cut state, spec, mode."""
        return self._check().stats()


def wan(spec: LinkSpec, *, fallback: Fallback = "auto") -> Wan:
    """A :class:`Wan` (not yet started; use it in ``with``). See :class:`Wan` for fallback."""
    return Wan(spec, fallback=fallback)
