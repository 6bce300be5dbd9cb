"""Framed, authenticated, multi-stream transport between two agents.

    from xmig.transport import Channel, PeerPolicy, connect, listen
"""

from xmig.transport.channels import Channel, ChannelSpec
from xmig.transport.client import connect
from xmig.transport.driver import TransportSession
from xmig.transport.peers import PeerIdentity, PeerPolicy
from xmig.transport.server import Listener, listen
from xmig.transport.session import SessionConfig

__all__ = [
    "Channel",
    "ChannelSpec",
    "Listener",
    "PeerIdentity",
    "PeerPolicy",
    "SessionConfig",
    "TransportSession",
    "connect",
    "listen",
]
