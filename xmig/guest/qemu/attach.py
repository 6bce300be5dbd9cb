"""Attach to a running QEMU by its QMP socket: what ``xmig migrate --qemu-qmp`` migrates.

What xmig needs of that QEMU is learned from QMP, and from the command line of the process
at the socket's other end (``SO_PEERCRED``, ``/proc/PID/cmdline``) for what QMP does not
tell (the kernel command line the destination must be given, the serial log):

- a Unix socket with something listening (else :class:`~xmig.errors.GuestNotFound`, saying
  what is there instead: nothing, a directory, a regular file, a stale socket);
- a QMP greeting at once (else: not a QEMU, :class:`~xmig.errors.QemuError`, within
  :data:`GREETING_TIMEOUT_S`), and the migration capabilities and commands the QEMU backend
  uses (:class:`~xmig.errors.QemuCapabilityError`);
- RAM in one shared, file-backed memory backend (``memory-backend-file,share=on``): the
  RAM check reads it from the file (:mod:`~xmig.guest.qemu.ramcheck`) (ConfigError);
- at most one disk drive, raw or qcow2, whose file exists (DiskFormatError, DiskNotFound).

Nothing is changed in the QEMU by attaching: only queries are run; and nothing is created.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

from xmig.errors import (
    ConfigError,
    DiskFormatError,
    DiskNotFound,
    QemuCapabilityError,
    QemuError,
)
from xmig.guest.qemu.machine import QemuConfig, QemuGuest
from xmig.private import connect_unix

#: what :mod:`xmig.guest.qemu.migrate` and :mod:`~xmig.guest.qemu.mirror` ask of a QEMU
NEEDED_CAPABILITIES = ("events", "return-path", "pause-before-switchover")
NEEDED_COMMANDS = ("migrate", "migrate-continue", "migrate-set-parameters", "blockdev-add",
                   "blockdev-mirror", "block-job-cancel", "query-cpus-fast")
DISK_FORMATS = ("raw", "qcow2")
#: a QMP server greets as soon as it accepts: what does not within this is not one
GREETING_TIMEOUT_S = 2.0
#: QMP capabilities negotiation and the queries, after the greeting was seen
QMP_TIMEOUT_S = 10.0
QMP_SOCKET = "a QEMU QMP socket"


def peer_of(path: Path, timeout: float = GREETING_TIMEOUT_S) -> tuple[int | None, dict[str, Any]]:
    """The pid at the other end of the unix socket ``path`` and its first line, which for
    QMP is the greeting, sent at once on connecting. GuestNotFound when there is no socket
    (not found, a directory, a regular file, ...) or nothing listens there; QemuError when
    what answers does not greet as QMP within ``timeout``. Only connects and reads."""
    sock = connect_unix(path, QMP_SOCKET, timeout)
    with sock:
        try:
            cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                   struct.calcsize("3i"))
            line = sock.makefile("rb").readline(65536)
        except TimeoutError as err:
            raise QemuError(f"{path} is not a QEMU QMP socket: it did not greet within "
                            f"{timeout:g} s, as QMP does at once (or its QEMU serves another "
                            "QMP client: one at a time)") from err
        except OSError as err:
            raise QemuError(f"{path} is not a QEMU QMP socket: reading its greeting failed: "
                            f"{err.strerror or err}") from err
    if not line:
        raise QemuError(f"{path} is not a QEMU QMP socket: it closed the connection without "
                        "a greeting")
    pid = struct.unpack("3i", cred)[0] or None
    try:
        greeting = json.loads(line)
    except ValueError:
        greeting = None
    if not isinstance(greeting, dict) or not isinstance(greeting.get("QMP"), dict):
        raise QemuError(f"{path} is not a QEMU QMP socket: it answered with something that "
                        f"is not a QMP greeting ({line[:60]!r})")
    return pid, greeting


def missing_features(commands: set[str], capabilities: set[str]) -> list[str]:
    """What of :data:`NEEDED_COMMANDS` and :data:`NEEDED_CAPABILITIES` a QEMU lacks, given
    its ``query-commands`` and ``query-migrate-capabilities`` names."""
    missing = [c for c in NEEDED_COMMANDS if c not in commands]
    return missing + [f"capability {c}" for c in NEEDED_CAPABILITIES if c not in capabilities]


def option(argv: Sequence[str], name: str) -> str | None:
    """The value of QEMU option ``name`` (e.g. ``-append``) in ``argv``, the last one."""
    value = None
    for i, arg in enumerate(argv[:-1]):
        if arg in (name, "-" + name):
            value = argv[i + 1]
    return value


def process_argv(pid: int | None) -> list[str]:
    """The command line of process ``pid`` (empty when it cannot be read)."""
    if pid is None:
        return []
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [os.fsdecode(a) for a in raw.split(b"\0") if a]


async def attach_qemu(qmp_socket: Path, *, workdir: Path,
                      timeout: float = GREETING_TIMEOUT_S) -> QemuGuest:
    """Connect to the QEMU at ``qmp_socket`` and describe it (:class:`QemuConfig`) after
    checking it can be migrated; the caller owns the returned guest (``quit`` stops it).
    A socket that does not greet as QMP within ``timeout`` is refused (QemuError). Nothing
    is created, in ``workdir`` (which need not exist yet) or anywhere."""
    qmp_socket = qmp_socket.absolute()
    pid, greeting = await asyncio.to_thread(peer_of, qmp_socket, timeout)
    client = QMPClient("xmig-attach")
    try:
        async with asyncio.timeout(QMP_TIMEOUT_S):
            await client.connect(str(qmp_socket))
    except (QMPError, OSError) as err:  # TimeoutError is an OSError
        with contextlib.suppress(QMPError, OSError, EOFError):
            await client.disconnect()
        raise QemuError(f"cannot talk QMP at {qmp_socket}: {err!r}") from err
    try:
        async with asyncio.timeout(QMP_TIMEOUT_S):
            return await _describe(client, qmp_socket, pid, greeting, workdir)
    except TimeoutError as err:
        with contextlib.suppress(QMPError, OSError, EOFError):
            await client.disconnect()
        raise QemuError(f"QEMU at {qmp_socket} did not answer its queries within "
                        f"{QMP_TIMEOUT_S:g} s") from err
    except BaseException:
        with contextlib.suppress(QMPError, OSError, EOFError):
            await client.disconnect()
        raise


async def _run(client: QMPClient, command: str, args: dict[str, Any] | None = None) -> Any:
    try:
        return await client.execute(command, args)
    except (QMPError, OSError) as err:
        raise QemuError(f"QMP {command}: {err}") from err


async def _describe(client: QMPClient, qmp_socket: Path, pid: int | None,
                    greeting: dict[str, Any], workdir: Path) -> QemuGuest:
    version = greeting["QMP"].get("version", {}).get("qemu", {})
    where = f"QEMU {version.get('major')}.{version.get('minor')} at {qmp_socket}"
    commands = {c["name"] for c in await _run(client, "query-commands")}
    caps = {c["capability"] for c in await _run(client, "query-migrate-capabilities")}
    missing = missing_features(commands, caps)
    if missing:
        raise QemuCapabilityError(f"{where} lacks {', '.join(missing)}")
    status = str((await _run(client, "query-status"))["status"])
    if status not in ("running", "paused", "prelaunch"):
        raise QemuError(f"{where} is {status}: only a running, paused or not yet started "
                        "guest migrates")

    memdevs = await _run(client, "query-memdev")
    if len(memdevs) != 1 or not memdevs[0].get("share") or "id" not in memdevs[0]:
        raise ConfigError(f"{where}: RAM must be one shared memory-backend-file "
                          "(share=on, mem-path=...), which xmig's RAM check reads")
    mem = memdevs[0]
    try:
        mem_path = Path(str(await client.execute(
            "qom-get", {"path": f"/objects/{mem['id']}", "property": "mem-path"})))
    except QMPError as err:
        raise ConfigError(f"{where}: RAM backend {mem['id']} is not file-backed "
                          "(memory-backend-file)") from err
    cpus = await _run(client, "query-cpus-fast")
    disk, device, disk_bytes = await _disk(client, where)

    argv = process_argv(pid)
    name = (option(argv, "-name") or "").split(",")[0].removeprefix("guest=")
    serial = option(argv, "-serial") or ""
    config = QemuConfig(
        kernel=Path(option(argv, "-kernel") or "/nonexistent"),
        initrd=Path(option(argv, "-initrd") or "/nonexistent"),
        append=option(argv, "-append") or "", disk=disk, ram_mb=int(mem["size"]) >> 20,
        smp=len(cpus), name=name or qmp_socket.stem, mem_path=mem_path,
        qemu=argv[0] if argv else "qemu-system-x86_64")
    return QemuGuest.adopt(
        config, workdir, client, qmp_socket=qmp_socket, pid=pid,
        serial_log=Path(serial.removeprefix("file:")) if serial.startswith("file:") else None,
        disk_device=device, disk_bytes=disk_bytes)


async def _disk(client: QMPClient, where: str) -> tuple[Path | None, str, int]:
    """The guest's one disk drive: (file, drive name, virtual size); (None, "", 0) without."""
    drives = [b for b in await _run(client, "query-block")
              if b.get("inserted") and not b.get("removable")]
    if not drives:
        return None, "", 0
    if len(drives) > 1:
        raise ConfigError(f"{where} has {len(drives)} disks "
                          f"({', '.join(str(b['device']) for b in drives)}); xmig migrates one")
    drive = drives[0]
    inserted = drive["inserted"]
    fmt = str(inserted.get("drv", ""))
    if fmt not in DISK_FORMATS:
        raise DiskFormatError(f"{where}: disk {drive['device']} is {fmt or 'of no format'}, "
                              f"not {' or '.join(DISK_FORMATS)}")
    path = Path(str(inserted.get("file", "")))
    if not path.exists():
        raise DiskNotFound(f"{where}: disk {drive['device']} file {path} not found")
    device = str(drive.get("device") or inserted.get("node-name"))
    return path, device, int(inserted["image"]["virtual-size"])
