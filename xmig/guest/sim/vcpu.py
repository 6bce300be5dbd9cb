"""The guest process: its vCPU loop, the host's commands and the UDP service, in one thread.

The loop runs in periods, as QEMU's CPU throttle does: :data:`WORK_S` of work, then, with
throttle ``f`` (read from the control block), a stall of ``WORK_S × f / (1 − f)`` — so the
vCPU works ``1 − f`` of the time. (A fixed work period keeps the cost of waking from a stall,
measured at ~0.2 ms of slower chunks here, a constant few per cent at every ``f``.) A throttle
changed during a stall applies within :data:`STALL_STEP_S`. Within its work time the loop
runs workload chunks while the rate allows (a credit of ``rate × work time``), and between
chunks it answers the host and UDP clients — those are its safe points: a pause stops the
loop there, between two chunks, never inside one. The host and clients are served during
stalls too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from xmig.errors import ConfigError, GuestError, GuestStateError, XmigError
from xmig.guest.sim import shm
from xmig.guest.sim.blockdev import BlockDevice, QueuedDisk, open_block_device
from xmig.guest.sim.config import MIN_OLTP_DISK_BYTES, SimConfig
from xmig.guest.sim.control import MessageReader, b64, error_reply, send_message, unb64
from xmig.guest.sim.devstate import decode_device_state, encode_device_state
from xmig.guest.sim.fill import fill_ram
from xmig.guest.sim.ledger import WriteLedger
from xmig.guest.sim.protocol import (
    BAD_REQUEST,
    NOT_FOUND,
    OK,
    OP_GET,
    OP_PING,
    OP_PUT,
    TABLE_FULL,
    ProtocolViolation,
    Reply,
    Request,
    progress_payload,
)
from xmig.guest.sim.shm import ControlBlock, SharedPaths
from xmig.guest.sim.table import SLOT_BYTES, KvTable, TableFull
from xmig.guest.sim.workloads import TICK_S, GuestRam, Workload, WorkloadSpec
from xmig.memory.guest import PAGE_SIZE

WORK_S = 0.010
STALL_STEP_S = 0.010
WINDOW_S = 0.5
BIND_RETRY_S = 1.0
DISK_CREDIT_FLOOR = 32 * 1024


class Orphaned(BaseException):
    """The host is gone (control channel closed, or parent-death signal)."""


class GuestProcess:
    """Everything one guest process holds. :meth:`run` is its whole life."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = MessageReader(sock)
        self.state = shm.STATE_STARTING
        self.quitting = False
        self.orphaned = False
        self.owns_ram = False
        self.created: list[Path] = []
        self.ctl: ControlBlock | None = None
        self.udp: socket.socket | None = None
        self.udp_port: int | None = None
        self.disk: BlockDevice | None = None
        self.disk_size = 0
        self.ledger: WriteLedger | None = None
        self.table: KvTable | None = None
        self.workload: Workload | None = None
        self.udp_requests = 0
        self.first_resume_pending = False
        self.first_progress_pending = False
        self.clock: dict[str, float] = {}
        self.mem_credit = 0.0
        self.disk_credit = 0.0
        self.tick_carry = 0.0
        self.window: tuple[float, int, int] = (time.monotonic(), 0, 0)
        self.busy_s = 0.0
        self.stalled_s = 0.0

    # ---- life -------------------------------------------------------------------------

    def run(self) -> int:
        try:
            init = self._next_message()
            try:
                info = self._setup(init)
            except (XmigError, OSError, KeyError, TypeError, ValueError) as err:
                send_message(self.sock, error_reply(int(init.get("id", 0)), err))
                return 2
            send_message(self.sock, {"id": init.get("id", 0), "ok": True, **info})
            while not self.quitting:
                if self.state == shm.STATE_RUNNING:
                    self._slice()
                else:
                    self._serve(None)
            return 0
        except Orphaned:
            self.orphaned = True
            return 0
        except Exception:
            traceback.print_exc(file=sys.stderr)
            self._set_state(shm.STATE_FAILED)
            return 3
        finally:
            self._teardown()

    def _next_message(self) -> dict[str, Any]:
        while True:
            select.select([self.sock], [], [])
            messages = self.reader.read_available()
            if messages:
                return messages[0]
            if self.reader.eof:
                raise Orphaned

    def _create(self, path: Path, size: int) -> None:
        shm.create_file(path, size)
        self.created.append(path)

    def _setup(self, init: dict[str, Any]) -> dict[str, Any]:
        self.config = config = SimConfig.from_json(init["config"])
        if config.nice:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, config.nice)
                # the guest runs in its own session, so with autogroup scheduling it is its
                # own group: nice weighs only inside a group, the group's own nice between
                # groups (sched(7))
                with contextlib.suppress(FileNotFoundError):
                    Path("/proc/self/autogroup").write_text(f"{config.nice}\n")
            except OSError as err:
                raise ConfigError(f"guest nice {config.nice}: {err.strerror} (a negative "
                                  "value needs root)") from err
        self.paths = paths = SharedPaths.from_json(init["paths"])
        incoming = init["mode"] == "incoming"
        self._create(paths.control, shm.CONTROL_BYTES)
        self.ctl = ControlBlock(shm.map_file(paths.control, shm.CONTROL_BYTES))
        self.ctl.init(os.getpid())
        self._create(paths.dirty, config.page_count)
        if not incoming or init.get("create_ram", True):
            self._create(paths.ram, config.ram_bytes)
            self.owns_ram = True
        self.ram_mm = shm.map_file(paths.ram, config.ram_bytes)
        self.dirty_mm = shm.map_file(paths.dirty, config.page_count)
        dirty = np.frombuffer(self.dirty_mm, np.uint8, config.page_count)
        self.ram = GuestRam(self.ram_mm, dirty, config.write_size)
        self.ram_view = memoryview(self.ram_mm)
        if config.disk_url:
            self._open_disk(config, Path(init["ledger_path"]))
        info: dict[str, Any] = {"pid": os.getpid()}
        if incoming:
            self.first_resume_pending = True
            self.state = shm.STATE_INCOMING
        else:
            dirty[:] = 1  # the first fetch after start returns every page
            stats = fill_ram(
                self.ram.pages, fill_pages=config.data_pages, seed=config.seed,
                zero_fraction=config.zero_fraction, text_fraction=config.text_fraction,
            )
            info["fill"] = vars(stats)
            self.table = self._table(config.page_count - config.table_pages, config.table_pages, 0)
            self.workload = self._workload(WorkloadSpec.from_config(config))
            self.state = shm.STATE_PAUSED
            if not init.get("paused", False):
                info.update(self._resume())
        self._publish(time.monotonic())
        return info

    def _open_disk(self, config: SimConfig, ledger_path: Path) -> None:
        device = open_block_device(config.disk_url or "")
        self.disk = QueuedDisk(device, config.disk_queue_depth) if config.disk_queue_depth \
            else device
        if config.disk_bytes > self.disk.size:
            raise ConfigError(f"disk_bytes {config.disk_bytes} > the device's {self.disk.size}")
        self.disk_size = config.disk_bytes or self.disk.size
        if config.workload == "oltp" and self.disk_size < MIN_OLTP_DISK_BYTES:
            raise ConfigError(f"oltp needs a disk of at least {MIN_OLTP_DISK_BYTES} bytes")
        self.ledger = WriteLedger(ledger_path)

    def _table(self, first_page: int, pages: int, entries: int) -> KvTable:
        return KvTable(self.ram_view, first_page=first_page, pages=pages,
                       mark_page=self.ram.mark_page, entries=entries)

    def _workload(self, spec: WorkloadSpec) -> Workload:
        assert self.table is not None
        return Workload(spec, self.ram, self.table, disk=self.disk, ledger=self.ledger,
                        disk_size=self.disk_size)

    def _teardown(self) -> None:
        # a parent-death or stop signal now would raise out of the teardown half done
        # (leaving the shared files of an orphan behind): the process ends after it anyway
        # (ignored, not masked: another thread may take the signal for the main thread)
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
        for close in (self._close_udp, self._close_disk):
            try:
                close()
            except Exception:
                traceback.print_exc(file=sys.stderr)
        if self.state != shm.STATE_FAILED:
            self._set_state(shm.STATE_EXITED)
        if self.table is not None:
            self.table.release()
        if hasattr(self, "ram"):
            self.ram.release()
            self.ram_view.release()
            shm.unmap(self.ram_mm)
            shm.unmap(self.dirty_mm)
        if self.ctl is not None:
            self.ctl.close()
        if self.orphaned:  # nobody will clean up after us (a RAM file given is not ours)
            shm.remove_files(*self.created)

    def _close_disk(self) -> None:
        try:
            if self.disk is not None:  # drains the queue: its last acknowledgements first
                self.disk.flush()
                self.disk.close()
                self.disk = None
        finally:
            if self.ledger is not None:
                self.ledger.close()

    # ---- the vCPU loop ----------------------------------------------------------------

    def _slice(self) -> None:
        wl = self.workload
        assert wl is not None and self.ctl is not None
        start = time.monotonic()
        work_end = start + WORK_S
        spec = wl.spec
        if wl.writes_pages:
            cap = max(spec.rate_Bps * WORK_S, spec.chunk_bytes)
            self.mem_credit = min(self.mem_credit + spec.rate_Bps * WORK_S, cap)
        if wl.writes_disk:
            cap = max(spec.disk_rate_Bps * WORK_S, DISK_CREDIT_FLOOR)
            self.disk_credit = min(self.disk_credit + spec.disk_rate_Bps * WORK_S, cap)
        if not wl.writes_pages and not wl.writes_disk:
            self.tick_carry += WORK_S / TICK_S
            ticks = int(self.tick_carry)
            self.tick_carry -= ticks
            wl.tick(ticks)
            self._publish(start)
        while self.state == shm.STATE_RUNNING:
            did = False
            if wl.writes_pages and self.mem_credit > 0:
                wl.run_chunk()
                self.mem_credit -= spec.chunk_bytes
                did = True
            if wl.writes_disk and self.disk_credit > 0 and not wl.disk_blocked:
                self.disk_credit -= wl.disk_op()
                did = True
            now = time.monotonic()
            if did:
                self._publish(now)
            if not did or now >= work_end:
                break
            self._serve(0)
        self.busy_s += min(time.monotonic(), work_end) - start
        while self.state == shm.STATE_RUNNING and (left := work_end - time.monotonic()) > 0:
            self._serve(left)  # credit spent early: the rest of the period is idle time
        throttle = self._stall(max(time.monotonic(), work_end))
        if self.ledger is not None:
            self.ledger.flush()
        floats = self.ctl.floats
        self.ctl.begin()
        floats[shm.F_BUSY_S], floats[shm.F_STALLED_S] = self.busy_s, self.stalled_s
        self.ctl.end()
        self._window(time.monotonic(), throttle)

    def _throttle(self) -> float:
        assert self.ctl is not None
        return min(max(float(self.ctl.floats[shm.F_THROTTLE]), 0.0), shm.MAX_THROTTLE)

    def _stall(self, since: float) -> float:
        """Stall for the current throttle's share; returns the throttle applied."""
        throttle = self._throttle()
        while self.state == shm.STATE_RUNNING:
            now = time.monotonic()
            left = since + WORK_S * throttle / (1.0 - throttle) - now
            if left <= 0:
                break
            self._serve(min(left, STALL_STEP_S))
            throttle = self._throttle()
        self.stalled_s += time.monotonic() - since
        return throttle

    def _publish(self, now: float) -> None:
        ctl, wl, ram = self.ctl, self.workload, self.ram
        assert ctl is not None
        ints, floats = ctl.ints, ctl.floats
        ctl.begin()
        ints[shm.I_STATE] = self.state
        ints[shm.I_PAGE_WRITES] = ram.page_writes
        ints[shm.I_DIRTY_MARKS] = ram.dirty_marks
        ints[shm.I_UDP_REQUESTS] = self.udp_requests
        ints[shm.I_UDP_PORT] = self.udp_port or 0
        if wl is not None:
            ints[shm.I_PROGRESS] = wl.progress
            ints[shm.I_DISK_WRITES] = wl.disk_writes
            ints[shm.I_DISK_WRITE_BYTES] = wl.disk_write_bytes
            ints[shm.I_DISK_READS] = wl.disk_reads
        if self.table is not None:
            ints[shm.I_TABLE_ENTRIES] = self.table.entries
        if self.state == shm.STATE_RUNNING:
            floats[shm.F_LAST_PROGRESS_MONO] = now
            floats[shm.F_LAST_PROGRESS_WALL] = time.time()
            if self.first_progress_pending:
                floats[shm.F_FIRST_PROGRESS_AFTER_RESUME_MONO] = now
                self.first_progress_pending = False
        ctl.end()

    def _window(self, now: float, throttle: float) -> None:
        """Every :data:`WINDOW_S`: the rates the host reads."""
        start, writes, progress = self.window
        elapsed = now - start
        if elapsed < WINDOW_S or self.ctl is None or self.workload is None:
            return
        distinct = self.ram.next_window()
        floats = self.ctl.floats
        self.ctl.begin()
        floats[shm.F_DIRTY_RATE] = distinct * PAGE_SIZE / elapsed
        floats[shm.F_WRITE_RATE] = (self.ram.page_writes - writes) * PAGE_SIZE / elapsed
        floats[shm.F_PROGRESS_RATE] = (self.workload.progress - progress) / elapsed
        floats[shm.F_APPLIED_THROTTLE] = throttle
        self.ctl.end()
        self.window = (now, self.ram.page_writes, self.workload.progress)

    def _set_state(self, state: int) -> None:
        self.state = state
        if self.ctl is not None:
            self.ctl.begin()
            self.ctl.ints[shm.I_STATE] = state
            self.ctl.end()

    # ---- serving the host and the clients --------------------------------------------

    def _serve(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` (None: forever) for a command or datagram; handle them."""
        udp = self.udp
        ready, _, _ = select.select([self.sock, udp] if udp else [self.sock], [], [], timeout)
        if self.sock in ready:
            for message in self.reader.read_available():
                self._command(message)
            if self.reader.eof:
                raise Orphaned
        if udp is not None and udp is self.udp and udp in ready:
            self._serve_udp(udp)

    def _command(self, message: dict[str, Any]) -> None:
        rid = int(message.get("id", 0))
        op = message.get("op")
        try:
            if op == "pause":
                result = self._pause()
            elif op == "resume":
                result = self._resume()
            elif op == "device_state":
                result = {"state": b64(self._device_state())}
            elif op == "load_device_state":
                result = self._load_device_state(unb64(str(message["state"])))
            elif op == "quit":
                self._pause()
                self.quitting = True
                result = {}
            elif op == "ping":
                result = {"state": shm.STATE_NAMES[self.state]}
            else:
                raise GuestError(f"unknown command {op!r}")
        except (XmigError, OSError, KeyError, TypeError, ValueError) as err:
            send_message(self.sock, error_reply(rid, err))
            return
        send_message(self.sock, {"id": rid, "ok": True, **result})

    def _pause(self) -> dict[str, Any]:
        if self.state == shm.STATE_RUNNING:
            now, wall = time.monotonic(), time.time()
            # every request in flight completes (as QEMU drains block I/O at a stop); no
            # flush: an fsync of the source image is no part of a migration's downtime
            # (the destination fsyncs before READY; quit flushes here)
            if isinstance(self.disk, QueuedDisk):
                self.disk.drain()
            if self.ledger is not None:
                self.ledger.flush()
            self._close_udp()
            self.state = shm.STATE_PAUSED
            assert self.ctl is not None
            floats = self.ctl.floats
            self.ctl.begin()
            floats[shm.F_PAUSED_AT_MONO], floats[shm.F_PAUSED_AT_WALL] = now, wall
            floats[shm.F_DIRTY_RATE] = floats[shm.F_WRITE_RATE] = floats[shm.F_PROGRESS_RATE] = 0
            self.ctl.end()
            self.clock = {
                "paused_at_mono": now,
                "paused_at_wall": wall,
                "last_progress_mono": float(floats[shm.F_LAST_PROGRESS_MONO]),
                "last_progress_wall": float(floats[shm.F_LAST_PROGRESS_WALL]),
            }
            self._publish(now)
        return {"state": shm.STATE_NAMES[self.state], **self.clock}

    def _resume(self) -> dict[str, Any]:
        if self.state == shm.STATE_INCOMING:
            raise GuestStateError("an incoming guest resumes only after load_device_state")
        if self.state == shm.STATE_PAUSED:
            self._bind_udp()
            if self.first_resume_pending:  # a future migration from here starts from all pages
                self.ram.dirty[:] = 1
                self.first_resume_pending = False
            now, wall = time.monotonic(), time.time()
            assert self.ctl is not None
            self.ctl.begin()
            self.ctl.floats[shm.F_RESUMED_AT_MONO] = now
            self.ctl.floats[shm.F_RESUMED_AT_WALL] = wall
            self.ctl.floats[shm.F_STARTED_MONO] = self.ctl.floats[shm.F_STARTED_MONO] or now
            self.ctl.end()
            self.first_progress_pending = True
            progress = self.workload.progress if self.workload else 0
            self.window = (now, self.ram.page_writes, progress)
            self.ram.next_window()
            self.state = shm.STATE_RUNNING
            self._publish(now)
        floats = self.ctl.floats if self.ctl is not None else None
        resumed = float(floats[shm.F_RESUMED_AT_MONO]) if floats is not None else 0.0
        return {"state": shm.STATE_NAMES[self.state], "udp_port": self.udp_port,
                "resumed_at_mono": resumed}

    def _device_state(self) -> bytes:
        if self.state != shm.STATE_PAUSED or self.workload is None or self.table is None:
            raise GuestStateError(f"device state of a {shm.STATE_NAMES[self.state]} guest")
        table = self.table
        return encode_device_state({
            "ram_bytes": self.config.ram_bytes,
            "page_size": PAGE_SIZE,
            "disk_size": self.disk_size,
            "table": {"first_page": table.first_page, "pages": table.pages,
                      "slot_bytes": SLOT_BYTES, "entries": table.entries},
            "workload": self.workload.state(),
            "counters": {"page_writes": self.ram.page_writes, "dirty_marks": self.ram.dirty_marks,
                         "udp_requests": self.udp_requests},
            "clock": self.clock,
            "udp_port": self.udp_port,
        })

    def _load_device_state(self, data: bytes) -> dict[str, Any]:
        if self.state != shm.STATE_INCOMING:
            raise GuestStateError(f"load_device_state on a {shm.STATE_NAMES[self.state]} guest")
        body = decode_device_state(data)
        if body["ram_bytes"] != self.config.ram_bytes or body["page_size"] != PAGE_SIZE:
            raise GuestStateError(
                f"device state of a {body['ram_bytes']}-byte guest, this one has "
                f"{self.config.ram_bytes}"
            )
        try:
            spec = WorkloadSpec(**body["workload"]["spec"])
            table = body["table"]
            if table["slot_bytes"] != SLOT_BYTES:
                raise GuestStateError(f"table slots of {table['slot_bytes']} bytes")
        except (TypeError, KeyError) as err:
            raise GuestStateError(f"malformed device state: {err!r}") from err
        if spec.name == "oltp" and spec.disk_rate_Bps > 0:
            if self.disk is None:
                raise GuestStateError("the device state's oltp workload needs a disk")
            if self.disk_size != int(body.get("disk_size", 0)):
                raise GuestStateError(
                    f"disk of {self.disk_size} bytes, the source's had {body.get('disk_size')}"
                )
        self.table = self._table(int(table["first_page"]), int(table["pages"]),
                                 int(table["entries"]))
        self.workload = self._workload(spec)
        self.workload.load_state(body["workload"])
        counters = body["counters"]
        self.ram.page_writes = int(counters["page_writes"])
        self.ram.dirty_marks = int(counters["dirty_marks"])
        self.udp_requests = int(counters["udp_requests"])
        self.clock = {k: float(v) for k, v in body["clock"].items()}
        port = body.get("udp_port")
        if self.config.udp_addr is not None and self.config.udp_addr[1] == 0 and port:
            self.udp_port = int(port)
        self.state = shm.STATE_PAUSED
        self._publish(time.monotonic())
        return {"progress": self.workload.progress}

    def _bind_udp(self) -> None:
        if self.config.udp_addr is None or self.udp is not None:
            return
        host, port = self.config.udp_addr
        port = port or self.udp_port or 0
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        deadline = time.monotonic() + BIND_RETRY_S
        while True:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.bind((host, port))
                break
            except OSError as err:
                sock.close()
                if err.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    what = f"cannot bind the UDP service to {host}:{port}: {err}"
                    raise GuestError(what) from err
                time.sleep(0.01)  # the source releases it when it pauses
        sock.setblocking(False)
        self.udp = sock
        self.udp_port = int(sock.getsockname()[1])

    def _close_udp(self) -> None:
        if self.udp is not None:
            self.udp.close()
            self.udp = None

    def _serve_udp(self, udp: socket.socket) -> None:
        for _ in range(64):
            try:
                data, addr = udp.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                request = Request.decode(data)
            except ProtocolViolation:
                continue
            self.udp_requests += 1
            with contextlib.suppress(OSError):
                udp.sendto(self._answer(request).encode(), addr)

    def _answer(self, request: Request) -> Reply:
        table, wl = self.table, self.workload
        assert table is not None and wl is not None
        if request.op == OP_PING:
            return Reply(OP_PING, request.rid, OK, progress_payload(wl.progress))
        if request.op == OP_PUT:
            try:
                table.put(request.key, request.value)
            except ValueError:
                return Reply(OP_PUT, request.rid, BAD_REQUEST)
            except TableFull:
                return Reply(OP_PUT, request.rid, TABLE_FULL)
            return Reply(OP_PUT, request.rid, OK)
        if request.op == OP_GET:
            value = table.get(request.key)
            if value is None:
                return Reply(OP_GET, request.rid, NOT_FOUND)
            return Reply(OP_GET, request.rid, OK, value)
        return Reply(request.op, request.rid, BAD_REQUEST)  # pragma: no cover

