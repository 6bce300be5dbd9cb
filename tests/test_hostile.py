"""A hostile source: a real TLS client holding a valid certificate of the agent's CA, speaking
the real protocol to a real ``xmig agent`` process. Each attack is refused, typed; no file
outside the agent's own names changes (every file beside its workdir is hashed before and
after); the agent's memory stays bounded; and a legitimate migration still succeeds on the
same agent afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import ssl
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.opsproc import Proc, is_ready, spawn, xmig
from xmig.errors import AuthenticationError, PeerNotAllowed, TransportError
from xmig.protocol import control
from xmig.transport import Channel, SessionConfig, connect
from xmig.transport.certs import Issued, PkiPaths, init_pki, issue
from xmig.transport.frames import HEADER_SIZE, FrameType, encode_frame
from xmig.transport.hello import Hello, Welcome
from xmig.transport.tls import client_context

MiB = 1 << 20
TOKEN = "c0" * 16
RSS_GROWTH_LIMIT = 96 * MiB
SESSION = SessionConfig(idle_timeout=5.0, resume_deadline=5.0)


@dataclass
class World:
    tmp: Path
    pki: PkiPaths
    intruder: PkiPaths  #: another client certificate of the same CA
    agent: Proc
    port: int
    workdir: Path
    rss_before: int
    migrations: int = 0

    def hashes(self) -> dict[str, str]:
        """Every file beside the agent's workdir and in it, but for its incoming-* dirs."""
        out: dict[str, str] = {}
        for root, dirs, files in os.walk(self.tmp):
            here = Path(root)
            if here == self.workdir:
                dirs[:] = [d for d in dirs if not d.startswith("incoming-")]
            for name in files:
                path = here / name
                if path.suffix in (".stderr",) or not path.is_file() or path.is_symlink():
                    continue
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        return out

    def rss(self) -> int:
        status = Path(f"/proc/{self.agent.popen.pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    def incoming(self) -> set[str]:
        return {p.name for p in self.workdir.glob("incoming-*")}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("hostile")
    pki = init_pki(tmp / "pki", server_names=("127.0.0.1",))
    intruder_dir = tmp / "intruder"
    intruder_dir.mkdir()
    now = dt.datetime.now(dt.UTC)
    ca = Issued.load(pki.directory, "ca")
    issue(ca, "intruder", server=False, not_before=now - dt.timedelta(hours=1),
          not_after=now + dt.timedelta(days=1)).write(intruder_dir, "client")
    ca.write(intruder_dir, "ca")
    # what a traversal would hit: a running guest's disk next door, a file above the workdir
    victim = tmp / "victim"
    victim.mkdir()
    (victim / "disk.raw").write_bytes(os.urandom(64 * 1024))
    (tmp / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    workdir = tmp / "agent"
    agent = spawn(["agent", "--listen", "127.0.0.1:0", "--pki", str(pki.directory),
                   "--workdir", str(workdir), "--json"], tmp, "agent")
    try:
        port = agent.expect(is_ready("agent"), 30)["port"]
        world = World(tmp, pki, PkiPaths.of(intruder_dir), agent, port, workdir, 0)
        world.rss_before = world.rss()
        yield world
    finally:
        agent.kill()


async def say(world: World, *payloads: bytes, pki: PkiPaths | None = None,
              timeout: float = 30.0) -> control.Message:
    """Open a session as a source, send ``payloads`` on CONTROL, return the first answer."""
    async with connect("127.0.0.1", world.port, tls=client_context(pki or world.pki),
                       config=SESSION, streams=1) as session:
        for payload in payloads:
            await session.send(Channel.CONTROL, payload)
        async with asyncio.timeout(timeout):
            reply = control.decode(await session.recv(Channel.CONTROL))
        with contextlib.suppress(TransportError, TimeoutError):
            await session.close(timeout=5)
        return reply


def negotiate(**changes: object) -> bytes:
    body: dict[str, object] = {
        "type": "negotiate", "migration": "vm1", "epoch": 1, "disk_bytes": 4 * MiB,
        "ram_bytes": 16 * MiB, "token": TOKEN,
        "guest": {"backend": "sim", "config": {"ram_bytes": 16 * MiB}, "verify": True}}
    body.update(changes)
    return json.dumps(body).encode()


def legitimate_migration(world: World) -> None:
    """A small reference guest migrates to the same agent, and runs there."""
    world.migrations += 1
    name = f"legit{world.migrations}"
    src = world.tmp / "legit-src"
    source = spawn(["guest", "start", "--name", name, "--workdir", str(src), "--ram", "16MiB",
                    "--disk", "4MiB", "--workload", "uniform", "--rate", "2MB/s", "--json"],
                   world.tmp, f"source-{name}")
    try:
        ctl = source.expect(is_ready("source"), 60)["ctl"]
        r = xmig("migrate", "--guest", ctl, "--to", f"127.0.0.1:{world.port}", "--pki",
                 str(world.pki.directory), "--json", timeout=120)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.splitlines()[-1])["status"] == "done"
        arrived = world.agent.expect(
            lambda e: is_ready("destination")(e) and e.get("name") == name, 30)
        assert source.wait(30) == 0
        assert xmig("guest", "stop", "--guest", arrived["ctl"]).returncode == 0
    finally:
        source.kill()


def check_after(world: World, before: dict[str, str], incoming: set[str]) -> None:
    """Nothing outside the agent's own names changed, memory stayed bounded, nothing of the
    refused session was left, and a legitimate migration still works."""
    assert world.hashes() == before
    grown = world.rss() - world.rss_before
    assert grown < RSS_GROWTH_LIMIT, f"the agent grew by {grown >> 20} MiB"
    left = world.incoming() - incoming
    for d in left:  # a refused negotiation leaves at most its journal
        assert {p.name for p in (world.workdir / d).iterdir()} <= {"journal"}, d
    legitimate_migration(world)


def refused(reply: control.Message, error: str) -> None:
    assert isinstance(reply, control.Refused), reply
    assert reply.error == error, reply


PATH_IDS = ["../victim/disk", "../../passwd", "/etc/passwd", "/tmp/x", "..", "a/b", "x" * 300]
BAD_FIELDS: list[dict[str, object]] = [
    {"ram_bytes": 2**50},  # beyond the protocol's bound
    {"disk_bytes": 2**55},
    {"epoch": "1"}, {"ram_bytes": -4096}, {"guest": [[[[]]]]},
    {"guest": {"backend": "sim", "config": {"ram_bytes": 16 * MiB, "shm_dir": "/etc"}}},
    {"guest": {"backend": "sim", "config": {"ram_bytes": 16 * MiB, "nice": -20}}},
    {"guest": {"backend": "sim", "config": {"ram_bytes": 16 * MiB,
                                            "udp_addr": ["0.0.0.0", 22]}}},
    {"guest": {"backend": "sim", "config": {"ram_bytes": 16 * MiB,
                                            "ledger_path": "/etc/shadow"}}},
]


async def test_an_id_that_names_a_path_is_refused_and_nothing_is_touched(
        world: World) -> None:
    before, incoming = world.hashes(), world.incoming()
    for migration in PATH_IDS:
        refused(await say(world, negotiate(migration=migration)), "ProtocolError")
        assert world.incoming() == incoming  # refused at decode: nothing made
    check_after(world, before, incoming)


async def test_wrong_types_huge_sizes_and_host_values_are_refused_at_decode(
        world: World) -> None:
    before, incoming = world.hashes(), world.incoming()
    for changes in BAD_FIELDS:
        refused(await say(world, negotiate(**changes)), "ProtocolError")
    for raw in (b"[" * 200_000, b"{" * 100_000, b"\xff" * 1000, b"null"):
        refused(await say(world, raw), "ProtocolError")
    assert world.incoming() == incoming
    check_after(world, before, incoming)


async def test_a_guest_larger_than_the_host_is_refused_before_anything_is_made(
        world: World) -> None:
    before, incoming = world.hashes(), world.incoming()
    ram = 1 << 43  # 8 TiB: within the protocol, beyond this host
    reply = await say(world, negotiate(ram_bytes=ram, guest={
        "backend": "sim", "config": {"ram_bytes": ram}, "verify": True}))
    refused(reply, "ResourceLimit")
    check_after(world, before, incoming)


async def test_a_decision_for_a_migration_it_does_not_own_is_refused(world: World) -> None:
    before, incoming = world.hashes(), world.incoming()
    if not world.migrations:
        legitimate_migration(world)
    for decision in (control.Go("legit1", 1, TOKEN), control.Abort("legit1", 0, "x", TOKEN),
                     control.Go("legit1", 1), control.Go("nobody", 2**40, TOKEN)):
        refused(await say(world, decision.encode()), "GuestNotFound")
    check_after(world, before, incoming)


async def test_a_flood_of_empty_frames_is_cut_off_and_memory_stays_bounded(
        world: World) -> None:
    before, incoming = world.hashes(), world.incoming()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", world.port, ssl=client_context(world.pki), server_hostname="127.0.0.1")
    flood = b"".join(encode_frame(FrameType.DATA, Channel.MEMORY, seq)
                     for seq in range(200_000))  # 5.6 MB of empty frames, sent 10 times
    cut = False
    try:
        writer.write(Hello("e" * 32, 0, True, SESSION.max_payload).encode())
        async with asyncio.timeout(60):
            for _ in range(10):
                writer.write(flood)
                await writer.drain()
    except (ConnectionError, ssl.SSLError):
        cut = True  # the agent dropped the connection mid-flood
    finally:
        writer.close()
    if not cut:  # everything was written into socket buffers: the agent must hang up
        async with asyncio.timeout(30):
            with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
                while await reader.read(65536):
                    pass
                raise ConnectionResetError("EOF")
    check_after(world, before, incoming)


async def test_a_session_cannot_be_resumed_with_another_certificate(world: World) -> None:
    before, incoming = world.hashes(), world.incoming()
    async with connect("127.0.0.1", world.port, tls=client_context(world.pki),
                       config=SESSION, streams=1) as session:
        sid = session.session.session_id
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", world.port, ssl=client_context(world.intruder),
            server_hostname="127.0.0.1")
        try:
            writer.write(Hello(sid, 1, False, SESSION.max_payload).encode())
            async with asyncio.timeout(30):
                answer = await reader.read(65536)
        except (ConnectionError, ssl.SSLError):
            answer = b""
        finally:
            writer.close()
        welcome = Welcome.decode(answer[HEADER_SIZE:])
        assert not welcome.ok and welcome.code == "not-owner", welcome
        # the session it tried to take is its owner's still: it answers
        await session.send(Channel.CONTROL, control.Go("nobody", 1, TOKEN).encode())
        async with asyncio.timeout(30):
            reply = control.decode(await session.recv(Channel.CONTROL))
        refused(reply, "GuestNotFound")
    check_after(world, before, incoming)


async def test_a_certificate_of_another_ca_never_reaches_the_protocol(
        world: World, tmp_path: Path) -> None:
    before, incoming = world.hashes(), world.incoming()
    foreign = init_pki(tmp_path / "foreign", server_names=("127.0.0.1",))
    with pytest.raises(AuthenticationError):
        await say(world, negotiate(), pki=foreign)
    check_after(world, before, incoming)


async def test_what_a_migration_leaves_on_the_agent_is_private(world: World) -> None:
    if not world.migrations:
        legitimate_migration(world)
    for directory in world.workdir.glob("incoming-*"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
        for path in directory.iterdir():
            mode = stat.S_IMODE(path.lstat().st_mode)
            assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
    assert stat.S_IMODE(world.workdir.stat().st_mode) == 0o700



async def test_an_identity_outside_allow_is_refused_typed_and_others_go_on(
        world: World, tmp_path: Path) -> None:
    picky = spawn(["agent", "--listen", "127.0.0.1:0", "--pki", str(world.pki.directory),
                   "--workdir", str(tmp_path / "picky"), "--allow", "CN=xmig-client",
                   "--json"], tmp_path, "picky")
    try:
        port = picky.expect(is_ready("agent"), 30)["port"]
        other = World(world.tmp, world.pki, world.intruder, picky, port, tmp_path / "picky", 0)
        with pytest.raises(PeerNotAllowed, match="intruder"):
            await say(other, negotiate(), pki=world.intruder)
        refused(await say(other, negotiate(migration="../x")), "ProtocolError")
    finally:
        picky.kill()
