"""QueuedDisk: the vCPU submits, one I/O thread serves in order, acknowledgements come back
by callback; a full queue blocks the submitter; an I/O error surfaces, typed, at the next
call and later requests are never acknowledged."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from xmig.errors import ConfigError, GuestError
from xmig.guest.sim.blockdev import FileBlockDevice, QueuedDisk, make_disk_image


class GatedDevice:
    """A device whose writes wait on a gate; records the order writes reached it."""

    def __init__(self, inner: FileBlockDevice) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.order: list[int] = []
        self.fail_at: int | None = None

    @property
    def size(self) -> int:
        return self.inner.size

    def pread(self, offset: int, length: int) -> bytes:
        return self.inner.pread(offset, length)

    def pwrite(self, offset: int, data: bytes) -> None:
        assert self.gate.wait(10)
        if offset == self.fail_at:
            raise OSError(5, "Input/output error")
        self.inner.pwrite(offset, data)
        self.order.append(offset)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


def device(tmp_path: Path) -> GatedDevice:
    return GatedDevice(FileBlockDevice(make_disk_image(tmp_path / "d.raw", 1 << 20)))


def test_writes_are_acknowledged_in_order_without_blocking_the_submitter(
    tmp_path: Path,
) -> None:
    dev = device(tmp_path)
    disk = QueuedDisk(dev, depth=8)
    acked: list[int] = []
    for i in range(8):  # the gate is shut: these only queue, none is acknowledged yet
        disk.submit_write(i * 4096, bytes([i + 1]) * 4096, lambda i=i: acked.append(i))
    assert acked == []
    dev.gate.set()
    disk.drain()
    assert acked == list(range(8)) and dev.order == [i * 4096 for i in range(8)]
    assert disk.pread(3 * 4096, 4096) == bytes([4]) * 4096
    disk.close()


def test_a_full_queue_blocks_the_submitter_until_the_device_moves(tmp_path: Path) -> None:
    dev = device(tmp_path)
    disk = QueuedDisk(dev, depth=2)
    for i in range(2):  # two outstanding (held at the gate): full
        disk.submit_write(i * 4096, b"x" * 4096, None)
    submitted = threading.Event()

    def one_more() -> None:
        disk.submit_write(2 * 4096, b"y" * 4096, None)
        submitted.set()

    t = threading.Thread(target=one_more)
    t.start()
    assert not submitted.wait(0.2)  # blocked: the queue is full
    dev.gate.set()
    assert submitted.wait(10)
    t.join()
    disk.close()
    assert dev.order == [0, 4096, 8192]


def test_an_io_error_is_raised_typed_and_later_writes_are_never_acknowledged(
    tmp_path: Path,
) -> None:
    dev = device(tmp_path)
    dev.fail_at = 4096
    disk = QueuedDisk(dev, depth=4)
    acked: list[int] = []
    for i in range(3):
        disk.submit_write(i * 4096, b"z" * 4096, lambda i=i: acked.append(i))
    dev.gate.set()
    with pytest.raises(GuestError, match="I/O failed"):
        disk.drain()
    assert acked == [0]  # the failed write and the one after it: not acknowledged
    with pytest.raises(GuestError):
        disk.submit_write(0, b"a", None)
    with pytest.raises(GuestError):
        disk.close()


def test_depth_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        QueuedDisk(device(tmp_path), depth=0)


def test_a_full_queue_says_so_before_a_submit_would_block_and_empties_as_it_is_served(
        tmp_path: Path) -> None:
    dev = device(tmp_path)
    disk = QueuedDisk(dev, depth=4)
    for i in range(3):
        disk.submit_write(i * 4096, b"x" * 4096, None)
    assert not disk.full  # one slot left
    disk.submit_write(3 * 4096, b"x" * 4096, None)
    assert disk.full  # the vCPU serves its clients instead of waiting here
    dev.gate.set()
    disk.drain()
    assert not disk.full
    disk.close()
