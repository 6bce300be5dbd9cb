"""The control protocol of a guest host (``xmig guest start``, ``xmig agent``) and its client.

A host listens on a unix socket ``DIR/NAME.ctl``. A client connects, sends one request (a
JSON object on one line) and reads JSON lines back until the answer, an object with ``ok``::

    {"op": "status"}                       -> {"ok": true, "status": {...}}
    {"op": "stop"}                         -> {"ok": true, "status": {...}}   (guest gone)
    {"op": "migrate", "to": "HOST:PORT", "pki": "/abs/dir", ...}
                                           -> {"event": ...}*  then
                                              {"ok": true, "report": {...}}
                                           or {"ok": false, "error": {...}, "report": ...}
    {"op": "migrate", ..., "plan_s": 3}    -> {"event": ...}*  then
                                              {"ok": true, "plan": {...}}
                                           or {"ok": false, "error": {...}}
    {"op": "resolve", "migration": NAME, "force": "go"|"abort"}
                                           -> {"ok": true, "status": {...}}

An agent (``xmig agent``) also listens on ``DIR/agent.ctl`` for ``status`` (its migrations
in doubt) and ``resolve``; a guest host answers ``resolve`` only while its guest is in doubt.

An error is ``{"type": <XmigError subclass name>, "message": str, "after_go": bool}``; the
client turns it back into that class. Requests are validated here (:func:`parse_request`);
a bad one is a :class:`~xmig.errors.ConfigError` and changes nothing. Non-finite floats
(a predictor's "never") travel as ``null``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from xmig import errors
from xmig.errors import ConfigError, GuestError, GuestNotFound, GuestStateError, XmigError
from xmig.private import connect_unix
from xmig.protocol.control import MAX_PROBE_S

MAX_REQUEST_BYTES = 64 * 1024
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
UNIX_PATH_MAX = 107  #: sun_path holds 108 bytes, the last a NUL
SDPS_MODES = ("on", "off", "autoconverge")


def check_name(name: str) -> str:
    """A guest name: 1-64 of letters, digits, ``_.-``, not starting with a punctuation."""
    if not NAME_RE.match(name):
        raise ConfigError(f"guest name {name!r}: use 1-64 letters, digits, '_', '.', '-'")
    return name


def check_socket_path(path: Path) -> Path:
    """``path`` if a unix socket can be bound there (its length), else ConfigError."""
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise ConfigError(f"socket path {path} is longer than {UNIX_PATH_MAX} bytes: "
                          "use a shorter --workdir")
    return path


def claim_socket(path: Path) -> None:
    """Make ``path`` free for a new control socket: GuestStateError if a live host answers
    there, a stale socket is removed, anything else there is a ConfigError."""
    check_socket_path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if not path.is_socket():
        raise ConfigError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(os.fsencode(path))
        except ConnectionRefusedError:
            path.unlink()
            return
    raise GuestStateError(f"a guest host already listens on {path}")


def parse_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as (host, port); ConfigError otherwise."""
    host, sep, port_s = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port_s.isdigit() or not 0 <= int(port_s) < 65536:
        raise ConfigError(f"endpoint {text!r}: want HOST:PORT")
    return host, int(port_s)


@dataclass(frozen=True)
class StatusRequest:
    op = "status"


@dataclass(frozen=True)
class StopRequest:
    op = "stop"


@dataclass(frozen=True)
class MigrateRequest:
    """What ``xmig migrate`` asks a host to do (the flags, checked)."""

    to: str
    pki: str
    server_name: str | None = None  #: TLS name of the agent; default: the host of ``to``
    max_downtime_s: float = 0.3
    timeout_s: float = 300.0
    streams: int = 2
    sdps: str = "on"
    verify: bool = True
    bandwidth_bps: int | None = None  #: the session's rate cap (SessionConfig.rate_cap_bps)
    link_rate_bps: int | None = None  #: for link_utilization; default: bandwidth_bps
    connect_timeout_s: float = 10.0
    blackout_timeout_s: float = 10.0  #: pause to GO; past it the migration aborts
    #: plan instead of migrating: measure the guest, then the link, this long each, and
    #: answer the forecast (``{"ok": true, "plan": {...}}``); nothing is migrated
    plan_s: float | None = None
    #: the guest's progress may fall at most this fraction below its pace (None: no bound)
    max_penalty: float | None = None

    op = "migrate"

    def __post_init__(self) -> None:
        if not isinstance(self.to, str) or not isinstance(self.pki, str):
            raise ConfigError("to and pki must be strings")
        parse_endpoint(self.to)
        if not os.path.isabs(self.pki):
            raise ConfigError(f"pki {self.pki!r} must be an absolute path")
        for name in ("max_downtime_s", "timeout_s", "connect_timeout_s",
                     "blackout_timeout_s"):
            value = getattr(self, name)
            if not _number(value) or not 0 < value < 1e6:
                raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")
        if not _number(self.streams) or not isinstance(self.streams, int) \
                or not 1 <= self.streams <= 16:
            raise ConfigError(f"streams must be 1 to 16, not {self.streams!r}")
        if self.sdps not in SDPS_MODES:
            raise ConfigError(f"sdps must be one of {SDPS_MODES}, not {self.sdps!r}")
        if not isinstance(self.verify, bool):
            raise ConfigError("verify must be true or false")
        for name in ("bandwidth_bps", "link_rate_bps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise ConfigError(f"{name} must be a positive integer (bits/s), not {value!r}")
        if self.plan_s is not None and not (_number(self.plan_s)
                                            and 0 < self.plan_s <= MAX_PROBE_S):
            raise ConfigError(f"plan_s must be a number of seconds in (0, {MAX_PROBE_S:g}], "
                              f"not {self.plan_s!r}")
        if self.max_penalty is not None and not (_number(self.max_penalty)
                                                 and 0 < self.max_penalty < 1):
            raise ConfigError(f"max_penalty must be a fraction in (0, 1), not "
                              f"{self.max_penalty!r}")
        if self.server_name is not None and not (isinstance(self.server_name, str)
                                                 and self.server_name.strip()):
            raise ConfigError("server_name must be a non-empty string")

    @property
    def endpoint(self) -> tuple[str, int]:
        return parse_endpoint(self.to)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, **asdict(self)}


FORCES = ("go", "abort")


@dataclass(frozen=True)
class ResolveRequest:
    """An operator forces the side of a migration in doubt (``xmig resolve``)."""

    migration: str
    force: str  #: "go": the destination runs it; "abort": the source does

    op = "resolve"

    def __post_init__(self) -> None:
        if not isinstance(self.migration, str):
            raise ConfigError("migration must be a string")
        check_name(self.migration)
        if self.force not in FORCES:
            raise ConfigError(f"force must be one of {FORCES}, not {self.force!r}")

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, **asdict(self)}


Request = StatusRequest | StopRequest | MigrateRequest | ResolveRequest


def parse_request(line: bytes) -> Request:
    """One request line, validated; ConfigError if it is not one."""
    try:
        data = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"request is not JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError("request must be a JSON object")
    op = data.pop("op", None)
    if op in ("status", "stop"):
        if data:
            raise ConfigError(f"{op} takes no fields, got {sorted(data)}")
        return StatusRequest() if op == "status" else StopRequest()
    kinds: dict[str, type[MigrateRequest | ResolveRequest]] = {
        "migrate": MigrateRequest, "resolve": ResolveRequest}
    if op in kinds:
        try:
            return kinds[op](**data)
        except TypeError as err:
            raise ConfigError(f"bad {op} request: {err}") from err
    raise ConfigError(f"unknown op {op!r}: want status, stop, migrate or resolve")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def encode(obj: dict[str, Any]) -> bytes:
    """One JSON line (non-finite floats as null)."""
    return json.dumps(_finite(obj), allow_nan=False, default=str).encode() + b"\n"


def error_dict(err: BaseException, *, after_go: bool = False) -> dict[str, Any]:
    """An error for the wire; a MigrationAborted names its cause's type."""
    name = type(err).__name__ if isinstance(err, XmigError) else "XmigError"
    message = str(err) if isinstance(err, XmigError) else f"{type(err).__name__}: {err}"
    cause = err.__cause__
    if isinstance(err, errors.MigrationAborted) and cause is not None:
        message = f"the source guest runs on: {type(cause).__name__}: {cause}"
    return {"type": name, "message": message, "after_go": after_go}


async def answer_status_or_resolve(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, who: str,
        status: Callable[[], dict[str, Any]],
        force: Callable[[ResolveRequest], Awaitable[None]]) -> None:
    """One request on a control socket that takes ``status`` and ``resolve`` (an agent's,
    a source QEMU's in doubt; ``who`` names it in the refusal of anything else): read the
    line, act, answer one line (the status after it, or the typed error), close."""
    reply: dict[str, Any]
    try:
        async with asyncio.timeout(10.0):
            req = parse_request(await reader.readuntil(b"\n"))
        if isinstance(req, ResolveRequest):
            await force(req)
        elif not isinstance(req, StatusRequest):
            raise ConfigError(f"{who} takes status and resolve, not {req.op}")
        reply = {"ok": True, "status": status()}
    except XmigError as err:
        reply = {"ok": False, "error": error_dict(err)}
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as err:
        reply = {"ok": False, "error": error_dict(ConfigError(
            f"no request line: {type(err).__name__}"))}
    with contextlib.suppress(OSError, ConnectionError):
        writer.write(encode(reply))
        await writer.drain()
        writer.close()
        await writer.wait_closed()


def error_from(data: Any) -> XmigError:
    """The typed error an ``error`` object names (XmigError if the name is unknown)."""
    if not isinstance(data, dict):
        return GuestError(f"host sent a malformed error: {data!r}")
    cls = getattr(errors, str(data.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, XmigError)):
        cls = XmigError
    message = str(data.get("message", ""))
    try:
        return cls(message)
    except TypeError:  # errors whose constructors take more than a message
        return XmigError(f"{data.get('type')}: {message}")


# -- the client -----------------------------------------------------------------------


@dataclass
class Outcome:
    """How a migrate request ended: ``report`` (None if it never started) and ``error``."""

    report: dict[str, Any] | None
    error: XmigError | None = None
    after_go: bool = False


#: how long a host has to answer a status request: one that does not is not taken for one
PROBE_TIMEOUT_S = 10.0
NOT_A_HOST = "is not an xmig guest host's control socket"


def _is_reply(obj: Any) -> bool:
    """A line of the control protocol: an answer (``ok``) or a progress event."""
    return isinstance(obj, dict) and (isinstance(obj.get("ok"), bool) or "event" in obj)


class _Connection:
    """One request to a host. Until a line of the control protocol came back (``known``),
    anything else is a :class:`GuestNotFound`: the socket is not a host's."""

    def __init__(self, path: Path, timeout: float, *, known: bool = False) -> None:
        self.path = path
        self.sock = connect_unix(path, "an xmig guest host's control socket", timeout)
        self.buf = b""
        self.known = known

    def _not_a_host(self, why: str) -> GuestNotFound:
        return GuestNotFound(f"{self.path} {NOT_A_HOST} ({why})")

    def send(self, obj: dict[str, Any]) -> None:
        try:
            self.sock.sendall(encode(obj))
        except OSError as err:
            if not self.known:
                raise self._not_a_host(f"it closed the connection: {err}") from err
            raise GuestError(f"lost the guest host at {self.path}: {err}") from err

    def read(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                if not self.known:
                    raise self._not_a_host("it did not answer in time; or its host is hung")
                raise GuestError(f"the guest host at {self.path} did not answer in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError as err:
                if not self.known:
                    raise self._not_a_host(f"the connection broke: {err}") from err
                raise GuestError(f"lost the guest host at {self.path}: {err}") from err
            if not chunk:
                if not self.known:
                    raise self._not_a_host("it closed the connection without answering")
                raise GuestError(f"the guest host at {self.path} closed the connection "
                                 "without an answer (did it exit?)")
            self.buf += chunk
            if not self.known and len(self.buf) > MAX_REQUEST_BYTES and b"\n" not in self.buf:
                raise self._not_a_host("it answered with something that is not xmig's "
                                       "control protocol")
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            obj = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            if not self.known:
                raise self._not_a_host("it answered with something that is not xmig's "
                                       "control protocol") from err
            raise GuestError(f"the guest host sent a bad line: {err}") from err
        if not _is_reply(obj):
            if not self.known:
                raise self._not_a_host("it answered with something that is not xmig's "
                                       "control protocol")
            raise GuestError("the guest host sent a line that is not of its protocol")
        self.known = True
        return dict(obj)

    def close(self) -> None:
        self.sock.close()


def request(path: Path, op: str, *, timeout: float = 30.0,
            probe_timeout: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """``status`` or ``stop``: the host's status object; its typed error if it refused.
    GuestNotFound, in words, when ``path`` is not a host's control socket: not found, a
    directory or a file, nothing listening, or no answer of the protocol to ``status`` within
    ``probe_timeout`` (a ``stop`` is sent only to a socket that answered a ``status``)."""
    if op != "status":
        request(path, "status", probe_timeout=probe_timeout)
    return _exchange(path, {"op": op}, timeout=timeout, known=op != "status",
                     reply_timeout=probe_timeout if op == "status" else timeout)


def _exchange(path: Path, req: dict[str, Any], *, timeout: float, known: bool,
              reply_timeout: float) -> dict[str, Any]:
    """Send one request, read its one answer: the status object it carries, or the typed
    error it names."""
    conn = _Connection(path, timeout, known=known)
    try:
        conn.send(req)
        reply = conn.read(time.monotonic() + reply_timeout)
    finally:
        conn.close()
    if not reply.get("ok"):
        raise error_from(reply.get("error"))
    status = reply.get("status")
    return status if isinstance(status, dict) else {}


def migrate(path: Path, req: MigrateRequest, *,
            on_event: Callable[[dict[str, Any]], None] = lambda e: None,
            probe_timeout: float = PROBE_TIMEOUT_S) -> Outcome:
    """Ask the host at ``path`` to migrate its guest; ``on_event`` gets each progress event.
    When ``path`` is not a host's control socket (see :func:`request`: it is first asked its
    status) GuestNotFound is raised, saying why; anything after that is in the
    :class:`Outcome`."""
    request(path, "status", probe_timeout=probe_timeout)
    # a generous bound: the host ends every migration by itself (its own timeouts)
    deadline = time.monotonic() + req.connect_timeout_s + req.timeout_s + 600.0
    conn = _Connection(path, 10.0, known=True)
    try:
        try:
            conn.send(req.to_json())
        except GuestError as err:
            return Outcome(None, err)
        try:
            msg = _answer(conn, deadline, on_event)
        except GuestError as err:
            return Outcome(None, err)
        report = msg.get("report")
        report = report if isinstance(report, dict) else None
        if msg["ok"]:
            return Outcome(report)
        err_data = msg.get("error")
        after = bool(err_data.get("after_go")) if isinstance(err_data, dict) else False
        return Outcome(report, error_from(err_data), after)
    finally:
        conn.close()


def _answer(conn: _Connection, deadline: float,
            on_event: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The events a long request streams, each to ``on_event``, until its answer (the
    object with ``ok``), returned."""
    while True:
        msg = conn.read(deadline)
        if "ok" in msg:
            return msg
        on_event(msg)


def plan(path: Path, req: MigrateRequest, *,
         on_event: Callable[[dict[str, Any]], None] = lambda e: None,
         probe_timeout: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """Ask the host at ``path`` for a forecast of migrating its guest as ``req`` says
    (``req.plan_s`` set): the plan, or its typed error raised. Nothing is migrated."""
    if req.plan_s is None:
        raise ConfigError("a plan request needs plan_s")
    request(path, "status", probe_timeout=probe_timeout)
    deadline = time.monotonic() + req.connect_timeout_s + 2 * req.plan_s + 60.0
    conn = _Connection(path, 10.0, known=True)
    try:
        conn.send(req.to_json())
        msg = _answer(conn, deadline, on_event)
    finally:
        conn.close()
    if not msg["ok"]:
        raise error_from(msg.get("error"))
    found = msg.get("plan")
    if not isinstance(found, dict):
        raise GuestError("the host answered a plan request without a plan")
    return found


def resolve(path: Path, req: ResolveRequest, *, timeout: float = 60.0,
            probe_timeout: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """Ask the host or agent at ``path`` to force ``req.force`` on a migration in doubt
    there: its status afterwards, or its typed refusal (nothing changed). GuestNotFound
    when ``path`` is not a control socket (as :func:`request`)."""
    request(path, "status", probe_timeout=probe_timeout)
    return _exchange(path, req.to_json(), timeout=timeout, known=True, reply_timeout=timeout)
