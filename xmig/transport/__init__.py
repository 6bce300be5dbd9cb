"""Framed, authenticated, multi-stream transport between two agents.

    from xmig.transport import Channel, connect, listen
"""

from xmig.transport.channels import Channel, ChannelSpec
from xmig.transport.client import connect
from xmig.transport.driver import TransportSession
from xmig.transport.server import Listener, listen
from xmig.transport.session import SessionConfig

__all__ = [
    "Channel",
    "ChannelSpec",
    "Listener",
    "SessionConfig",
    "TransportSession",
    "connect",
    "listen",
]
