"""bench/fuzz.py: a short seeded run of every decoder a peer reaches, and the nastiest inputs
per decoder (deep nesting, huge counts and lengths, zstd bombs), each one a typed refusal
that changes nothing."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

from bench.fuzzing import core, engine, t_memory, t_nbd, t_storage
from xmig.errors import DiskTooSmall, NbdProtocolError, ProtocolError, StorageError
from xmig.guest.qemu import ramcheck
from xmig.memory.codec import FLAG_ZSTD, HEADER, MAX_COUNT, VERSION, MsgType, PageDecoder
from xmig.storage import nbd, wire
from xmig.storage.apply import DiskApplier

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "bench" / "fuzz.py"
SHORT_RUN_INPUTS = 24_000  # about 15 s here (two shared cores), 2,000 per decoder

#: crashes found in files this suite's owners of the fuzzer may not change (xmig/transport);
#: reported with reproducers in issue 8. Remove a name once its decoder is fixed.
KNOWN_OPEN: dict[str, str] = {}  #: decoders whose crashes are known and not fixed yet


def _open(name: str) -> Any:
    """``name`` as a parameter, expected to fail while its crash is open."""
    if name in KNOWN_OPEN:
        return pytest.param(name, marks=pytest.mark.xfail(reason=KNOWN_OPEN[name]))
    return name


@pytest.fixture(scope="module")
def short_run() -> dict[str, Any]:
    cmd = [sys.executable, str(FUZZ), "--json", "--engine", "mutation", "--seed", "1",
           "--inputs", str(SHORT_RUN_INPUTS), "--seconds", "120"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    assert proc.stdout, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def test_short_run_figures(short_run: dict[str, Any]) -> None:
    assert short_run["inputs"] == SHORT_RUN_INPUTS
    assert set(short_run["per_decoder"]) == set(engine.NAMES)
    assert not short_run["errors"] and not short_run["mutator_errors"]
    assert short_run["max_rss_mb"] <= 512
    assert short_run["crashes"] == sum(d["crashes"] for d in short_run["per_decoder"].values())
    for name, d in short_run["per_decoder"].items():
        assert d["inputs"] == SHORT_RUN_INPUTS // len(engine.NAMES)
        # every decoder both decoded something and refused something
        assert d["outcomes"] >= 2, (name, d)


@pytest.mark.parametrize("name", [_open(n) for n in engine.NAMES])
def test_short_run_no_crash(short_run: dict[str, Any], name: str) -> None:
    d = short_run["per_decoder"][name]
    mine = [c for c in short_run["crash_examples"] if c["decoder"] == name]
    assert d["crashes"] == 0, mine


@pytest.mark.parametrize("name", [_open(n) for n in engine.NAMES])
def test_nasty_inputs_are_typed_refusals(name: str) -> None:
    """Each decoder's hand-made worst cases (run first in every fuzz run), one by one."""
    (target,), errors = engine.load([name])
    assert not errors
    rec = core.Recorder()
    try:
        with core.guarded():
            outcomes = [rec.run(target, data) for data in target.nasty()]
    finally:
        t_nbd.close()
    assert rec.crashes == 0, [c.as_json() for c in rec.examples]
    assert all(o is not None for o in outcomes)


def test_guard_counts_untyped_errors_and_timeouts() -> None:
    def boom(data: bytes) -> str:
        if data == b"index":
            return str([][1])
        if data == b"typed":
            raise ProtocolError("no")
        if data == b"slow":
            raise core.InputTimeout("alarm")
        return "ok"

    target = core.Target("t", boom, lambda: [])
    rec = core.Recorder()
    with core.guarded():
        got = [rec.run(target, d) for d in (b"ok", b"typed", b"index", b"slow")]
    assert got == ["ok", "ProtocolError", None, None]
    assert rec.crashes == 2 and rec.stats["t"].outcomes == {"ok": 1, "ProtocolError": 1}
    assert [c.type for c in rec.examples] == ["IndexError", "InputTimeout"]
    assert rec.examples[0].input_hex == b"index".hex()


# -- the crashes found in xmig's storage, memory and RAM-check decoders, fixed -------------


def test_page_codec_refuses_a_zstd_bomb_before_allocating() -> None:
    dec = PageDecoder(1 << 20)
    for n_full in (MAX_COUNT, 1 << 20, 5000):
        size = 8 * n_full + n_full * 4096  # what the counts imply: 16 GiB, 4 GiB, 20 MiB
        payload = t_memory.zstd_claiming(size)
        head = HEADER.pack(VERSION, MsgType.PAGES, FLAG_ZSTD, 0, n_full, 0, 0, len(payload))
        msg = head + payload
        msg += struct.pack("<Q", xxhash.xxh3_64_intdigest(msg))
        with pytest.raises(ProtocolError):
            dec.decode(msg)
    small = PageDecoder(64)  # more entries than the guest has pages
    head = HEADER.pack(VERSION, MsgType.PAGES, FLAG_ZSTD, 0, 65, 0, 0, 0)
    with pytest.raises(ProtocolError, match="more entries"):
        small.decode(t_memory.fix_pages(head + bytes(8)))


def test_disk_wire_refuses_a_count_its_message_cannot_hold() -> None:
    for head in (struct.pack(">BQQQI", wire.BULK, 1, 0, 1 << 40, (1 << 32) - 1),
                 struct.pack(">BQI", wire.MIRROR, 1, (1 << 32) - 1)):
        with pytest.raises(StorageError, match="entries"):
            wire.decode(head + bytes(64 << 10))  # refused before 4 G run heads are read


def _applier() -> tuple[DiskApplier, t_storage.MemBackend]:
    image = t_storage.MemBackend(1 << 16)
    applier = DiskApplier(image, epoch=5)
    applier.hello(wire.Hello(5, 1 << 16))
    return applier, image


def test_applier_checks_a_message_whole_before_it_changes_anything() -> None:
    applier, image = _applier()
    # runs out of order: the first one used to be written before the second was refused
    bad = wire.BulkExtent(9, 0, 1 << 16, ((8192, b"b" * 10), (0, b"a" * 10)))
    with pytest.raises(StorageError):
        applier.apply_bulk(bad)
    assert not any(image.data) and applier.epoch == 5 and applier.bulk_pos == 0
    # a newer epoch in a message that is refused is not adopted
    with pytest.raises(StorageError):
        applier.apply_mirror(wire.MirrorBatch(9, (wire.MirrorRecord(1, 1 << 16, 1, b"x"),)))
    with pytest.raises(StorageError):
        applier.apply_done(wire.BulkDone(9, 1 << 16))
    assert applier.epoch == 5 and applier.applied_seq == 0
    fresh = DiskApplier(t_storage.MemBackend(4096), epoch=5)
    with pytest.raises(DiskTooSmall):
        fresh.hello(wire.Hello(7, 8192))
    assert fresh.epoch == 5 and fresh.source_size is None


def test_ram_fixups_are_checked_whole_before_any_is_written(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    ram.write_bytes(bytes(4 * ramcheck.CHUNK))
    good = struct.pack("<QI", 0, 4) + b"abcd"
    for tail in (struct.pack("<QI", 4 * ramcheck.CHUNK, 1) + b"x",  # beyond the file
                 struct.pack("<QI", 0, 99),  # longer than the message
                 b"trailing"):
        count = 2 if not tail.startswith(b"trailing") else 1
        with pytest.raises(ProtocolError):
            ramcheck.apply_fixups(ram, struct.pack("<III", 8192, count, 0) + good + tail)
        assert not any(ram.read_bytes())
    with pytest.raises(ProtocolError, match="cannot hold"):
        ramcheck.apply_fixups(ram, struct.pack("<III", 8192, (1 << 32) - 1, 0))


def test_digest_assembler_is_bounded_by_the_local_chunk_count() -> None:
    digests = np.arange(10, dtype=np.uint64)
    msgs = ramcheck.encode_digest_messages(digests, message_bytes=32)
    asm = ramcheck.DigestAssembler(chunks=10)
    lying = struct.pack("<QQI", 0, 1 << 60, 1) + bytes(8)
    with pytest.raises(ProtocolError, match="this RAM has 10"):
        asm.add(lying)
    with pytest.raises(ProtocolError):  # more digests than announced: nothing kept
        asm.add(struct.pack("<QQI", 0, 10, 0) + bytes(88))
    assert asm.total is None and not asm._parts
    assert [asm.add(m) for m in msgs][-1] and np.array_equal(asm.digests(), digests)


@pytest.fixture
def nbd_loop() -> Iterator[None]:
    yield
    t_nbd.close()


@pytest.mark.usefixtures("nbd_loop")
def test_nbd_parser_refuses_huge_lengths() -> None:
    flags = struct.pack(">I", 3)
    huge_option = struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_INFO, 1 << 31)
    with pytest.raises(NbdProtocolError):
        t_nbd.run(flags + huge_option)
    go = t_nbd.Option(nbd.OPT_GO, t_nbd._info()).encode()
    write = t_nbd.Request(nbd.CMD_WRITE, 0, (1 << 32) - 1).encode()
    with pytest.raises(NbdProtocolError):
        t_nbd.run(flags + go + write)
    beyond = t_nbd.Request(nbd.CMD_WRITE_ZEROES, (1 << 64) - 1, 2).encode()
    assert t_nbd.run(flags + go + beyond) == "eof"  # ENOSPC replied, then the client left


def test_atheris_engine_smoke() -> None:
    pytest.importorskip("atheris")
    cmd = [sys.executable, str(FUZZ), "--json", "--engine", "atheris", "--seed", "3",
           "--inputs", "3000", "--only", "storage_wire,ramcheck_chunks", "--seconds", "60"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    out = json.loads(proc.stdout)
    assert out["engine"] == "atheris" and out["crashes"] == 0 and not out["errors"]
    assert out["inputs"] == 3000 and "atheris" in out["versions"]
    assert out["per_decoder"]["storage_wire"]["outcomes"] >= 5
