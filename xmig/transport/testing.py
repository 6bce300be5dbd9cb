"""Reusable test helpers for the transport: two sans-IO sessions joined in memory."""

from __future__ import annotations

from dataclasses import dataclass, field

from xmig.transport.frames import Frame, FrameDecoder
from xmig.transport.hello import Hello
from xmig.transport.session import Event, Session, SessionConfig


@dataclass
class MemoryPair:
    """A client and a server :class:`Session` joined by in-memory connections.

    ``flush(conn)`` moves every frame either side wants to send on ``conn`` to the other
    side (optionally dropping them, as a cut would); ``now`` is advanced by the test.
    """

    config: SessionConfig = field(default_factory=SessionConfig)
    now: float = 0.0

    def __post_init__(self) -> None:
        self.client = Session("s" * 32, client=True, config=self.config, now=self.now)
        self.server = Session("s" * 32, client=False, config=self.config, now=self.now)
        self.wire: list[tuple[str, Frame]] = []  # every frame that crossed, for assertions

    def connect(self, conn: int) -> None:
        """Open connection ``conn`` and complete its HELLO/WELCOME exchange."""
        self.client.add_connection(conn, self.now)
        frame = self.client.frame_to_send(conn, self.now)
        assert frame is not None
        decoder = FrameDecoder(self.config.max_payload)
        decoder.feed(frame[0] + frame[1])
        first = decoder.next_frame()
        assert first is not None
        self.server.add_connection(conn, self.now, hello=Hello.decode(first), decoder=decoder)
        self.flush(conn)

    def _move(self, src: Session, dst: Session, label: str, conn: int, drop: bool) -> int:
        moved = 0
        while (frame := src.frame_to_send(conn, self.now)) is not None:
            data = frame[0] + frame[1]
            moved += 1
            if drop:
                continue
            dec = FrameDecoder(self.config.max_payload)
            dec.feed(data)
            decoded = dec.next_frame()
            assert decoded is not None
            self.wire.append((label, decoded))
            dst.receive_data(conn, data, self.now)
        return moved

    def flush(self, conn: int, *, drop: bool = False) -> int:
        """Exchange frames on ``conn`` until both sides are quiet; returns frames moved."""
        total = 0
        while True:
            moved = self._move(self.client, self.server, "c->s", conn, drop)
            moved += self._move(self.server, self.client, "s->c", conn, drop)
            total += moved
            if not moved:
                return total

    @staticmethod
    def events(session: Session) -> list[Event]:
        out = []
        while (ev := session.next_event()) is not None:
            out.append(ev)
        return out
