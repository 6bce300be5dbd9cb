"""The control channel between the host and a guest process: JSON lines over a socketpair.

Requests carry ``op`` and ``id``; each reply echoes ``id`` with ``ok`` and, on failure, the
name of an xmig guest error and its message. Only the slow path travels here (start, pause,
resume, device state, quit); throttle, progress and the dirty log live in shared memory.
End of file on the channel tells the guest that its host is gone.
"""

from __future__ import annotations

import base64
import json
import socket
from typing import Any

from xmig.errors import ConfigError, GuestError, GuestNotFound, GuestStateError

ERRORS: dict[str, type[GuestError] | type[ConfigError]] = {
    "GuestError": GuestError,
    "GuestNotFound": GuestNotFound,
    "GuestStateError": GuestStateError,
    "ConfigError": ConfigError,
}


def error_reply(rid: int, err: Exception) -> dict[str, Any]:
    name = type(err).__name__ if type(err).__name__ in ERRORS else "GuestError"
    return {"id": rid, "ok": False, "error": name, "message": str(err)}


def raise_for(reply: dict[str, Any]) -> dict[str, Any]:
    """``reply`` if it is a success; the error it carries otherwise."""
    if reply.get("ok"):
        return reply
    cls = ERRORS.get(str(reply.get("error")), GuestError)
    raise cls(str(reply.get("message", "guest refused")))


def send_message(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message, separators=(",", ":")).encode() + b"\n")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


class MessageReader:
    """Splits the bytes received on a control socket into messages."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""
        self.eof = False

    def read_available(self) -> list[dict[str, Any]]:
        """Receive once (the socket must be readable) and return the complete messages."""
        data = self._sock.recv(1 << 20)
        if not data:
            self.eof = True
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        return [json.loads(line) for line in lines if line]
