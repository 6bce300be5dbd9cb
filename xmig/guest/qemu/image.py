"""Build xmig's test guest from Debian packages: a kernel and a busybox initramfs.

``build_test_guest(build_dir)`` returns a :class:`GuestImage` (``vmlinuz`` and
``initramfs.cpio.gz`` in ``build_dir``); ``python -m xmig.guest.qemu.image BUILD_DIR`` (``make
guest-image``) does the same and prints the image as JSON. Nothing built is committed.

- Kernel: the package the ``linux-image-amd64`` meta-package depends on at its candidate
  version (resolved with ``apt-cache`` at build time, e.g. ``linux-image-6.1.0-56-amd64``),
  fetched with ``apt-get download`` into ``build_dir/debs``. Only ``vmlinuz`` and the six virtio
  modules are taken out of its data tarball (``dpkg-deb --fsys-tarfile``, streamed): ``dpkg -x``
  would unpack 400 MB to use 9 MB.
- Initramfs (cpio newc + gzip, written here, reproducible): ``/init`` (``init.sh`` beside this
  file), ``/bin/busybox`` from ``busybox-static``, the virtio modules (decompressed when the
  package ships them as ``.ko.xz`` / ``.ko.zst`` / ``.ko.gz``) and ``/bin/xmig-workload``, a
  static C program (``workload.c`` beside this file) compiled here with ``gcc -static``: under
  TCG a busybox ``dd`` loop dirties only 11–70 MiB/s and counts nothing, while the C program
  dirties pages as fast as the vCPU allows (or at a set rate), writes checkable disk records
  and prints a counter (see :mod:`xmig.guest.qemu.progress`).
- Cache: ``manifest.json`` records the inputs (kernel package and version, sha256 of busybox,
  init script and workload source, compiler version); when they match and the outputs exist,
  nothing is rebuilt. A file lock serialises concurrent builders.

The workload is chosen on the kernel command line: :func:`guest_cmdline`.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from xmig.errors import ConfigError, QemuError

FORMAT = 1
META_PACKAGE = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
)
WORKLOADS = ("mem", "disk", "cpu", "memdisk", "idle")
HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE / "init.sh"
WORKLOAD_SOURCE = HERE / "workload.c"
KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initramfs.cpio.gz"
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class GuestImage:
    """A built test guest: boot ``kernel`` with ``initrd`` and a :func:`guest_cmdline`."""

    kernel: Path
    initrd: Path
    kernel_package: str
    kernel_version: str
    kernel_release: str
    cached: bool
    build_s: float
    manifest: Mapping[str, Any] = field(default_factory=dict)


def guest_cmdline(workload: str = "idle", **params: int | float | str) -> str:
    """The kernel command line that runs ``workload`` with ``params`` (``mem_mb=64``,
    ``mem_rate`` MiB/s, ``disk_bs``, ``disk_mb``, ``disk_rate`` MiB/s, ``report_ms``)."""
    if workload not in WORKLOADS:
        raise ConfigError(f"unknown test-guest workload {workload!r} (one of {WORKLOADS})")
    words = ["console=ttyS0", "quiet", "panic=-1", f"xmig.workload={workload}"]
    for key, value in params.items():
        text = str(value)
        if not re.fullmatch(r"[a-z_]+", key) or not text or any(c.isspace() for c in text):
            raise ConfigError(f"bad test-guest parameter {key}={value!r}")
        words.append(f"xmig.{key}={text}")
    return " ".join(words)


# -- the build --------------------------------------------------------------------------


def build_test_guest(
    build_dir: str | os.PathLike[str],
    *,
    kernel_package: str | None = None,
    force: bool = False,
) -> GuestImage:
    """Build (or reuse) the test guest in ``build_dir``; QemuError when a step fails.

    ``kernel_package`` overrides the package resolved from ``linux-image-amd64``.
    """
    start = time.monotonic()
    out = Path(build_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out / ".lock"):
        local = _local_inputs()
        manifest_path = out / MANIFEST_NAME
        old = _read_manifest(manifest_path)
        try:
            if kernel_package is None:
                name, version = _resolve_kernel_package()
            else:
                name, version = kernel_package, _candidate_version(kernel_package)
        except QemuError:
            # no package lists (offline, before apt-get update): a matching build still serves
            if force or not _outputs_ok(out, old) or not _subset(old, local):
                raise
            name, version = str(old["kernel_package"]), str(old["kernel_version"])
        inputs = {"format": FORMAT, "kernel_package": name, "kernel_version": version, **local}
        if not force and _outputs_ok(out, old) and _subset(old, inputs):
            return _image(out, old, cached=True, build_s=time.monotonic() - start)
        deb = _download(name, version, out / "debs")
        kernel, release, modules = _extract_kernel(deb)
        workload = _compile_workload(out)
        initrd = _initramfs(modules, workload)
        _write_atomic(out / KERNEL_NAME, kernel)
        _write_atomic(out / INITRD_NAME, initrd)
        manifest = {
            **inputs,
            "kernel_release": release,
            "kernel_sha256": hashlib.sha256(kernel).hexdigest(),
            "initrd_sha256": hashlib.sha256(initrd).hexdigest(),
            "kernel_bytes": len(kernel),
            "initrd_bytes": len(initrd),
        }
        _write_atomic(manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())
        for stale in (out / "debs").glob("*.deb"):
            if stale != deb:
                stale.unlink()
        return _image(out, manifest, cached=False, build_s=time.monotonic() - start)


def _image(out: Path, manifest: Mapping[str, Any], *, cached: bool, build_s: float) -> GuestImage:
    return GuestImage(
        kernel=out / KERNEL_NAME,
        initrd=out / INITRD_NAME,
        kernel_package=str(manifest["kernel_package"]),
        kernel_version=str(manifest["kernel_version"]),
        kernel_release=str(manifest["kernel_release"]),
        cached=cached,
        build_s=build_s,
        manifest=dict(manifest),
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _subset(manifest: Mapping[str, Any], inputs: Mapping[str, Any]) -> bool:
    return all(manifest.get(key) == value for key, value in inputs.items())


def _outputs_ok(out: Path, manifest: Mapping[str, Any]) -> bool:
    try:
        return (
            (out / KERNEL_NAME).stat().st_size == manifest.get("kernel_bytes")
            and (out / INITRD_NAME).stat().st_size == manifest.get("initrd_bytes")
            and bool(manifest.get("kernel_release"))
        )
    except OSError:
        return False


def _local_inputs() -> dict[str, Any]:
    """What the build depends on besides the kernel package: hashed, so edits rebuild."""
    if not BUSYBOX.is_file():
        raise QemuError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    busybox = BUSYBOX.read_bytes()
    if not _is_static_elf(busybox):
        raise QemuError(f"{BUSYBOX} is dynamically linked: apt-get install busybox-static")
    gcc = shutil.which("gcc")
    if gcc is None:
        raise QemuError("gcc is missing (it compiles the guest workload): apt-get install gcc")
    version = _run([gcc, "-dumpfullversion"]).strip()
    return {
        "busybox_sha256": hashlib.sha256(busybox).hexdigest(),
        "init_sha256": hashlib.sha256(INIT_SCRIPT.read_bytes()).hexdigest(),
        "workload_sha256": hashlib.sha256(WORKLOAD_SOURCE.read_bytes()).hexdigest(),
        "gcc": version,
    }


def _is_static_elf(data: bytes) -> bool:
    """True for a 64-bit little-endian ELF with no program interpreter (PT_INTERP)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:
            return False
    return True


def _run(argv: list[str], *, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise QemuError(f"building the test guest: {argv[0]}: {err}") from err
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise QemuError(f"building the test guest: {' '.join(argv)} failed: {' / '.join(tail)}")
    return done.stdout


def _resolve_kernel_package() -> tuple[str, str]:
    """(package, version) that ``linux-image-amd64``'s candidate depends on, in one apt-cache
    call (each call here takes ~0.7 s: apt keeps no binary package cache)."""
    text = _run(["apt-cache", "show", "--no-all-versions", META_PACKAGE])
    found = re.search(r"^Depends:.*?(linux-image-[0-9][\w.+-]*) \(= ([^)\s]+)\)", text, re.M)
    if found is None:
        raise QemuError(
            f"apt-cache names no kernel package for {META_PACKAGE} (run apt-get update first)"
        )
    return found.group(1), found.group(2)


def _candidate_version(package: str) -> str:
    text = _run(["apt-cache", "policy", package])
    found = re.search(r"Candidate:\s*(\S+)", text)
    if found is None or found.group(1) == "(none)":
        raise QemuError(f"apt-cache offers no version of {package} (run apt-get update first)")
    return found.group(1)


def _download(package: str, version: str, debs: Path) -> Path:
    debs.mkdir(parents=True, exist_ok=True)
    for deb in debs.glob(f"{package}_*.deb"):
        if _run(["dpkg-deb", "-f", str(deb), "Version"]).strip() == version:
            return deb
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        # apt's sandbox user cannot write into a root-owned temporary folder: allow it
        os.chmod(tmp, 0o777)
        _run(["apt-get", "download", "-q", f"{package}={version}"], cwd=Path(tmp))
        got = list(Path(tmp).glob("*.deb"))
        if len(got) != 1:
            raise QemuError(f"apt-get download {package}={version} left {len(got)} files")
        return Path(shutil.move(got[0], debs / got[0].name))


def _extract_kernel(deb: Path) -> tuple[bytes, str, dict[str, bytes]]:
    """(vmlinuz, kernel release, {module: .ko bytes}) read from the package's data tarball."""
    kernel: bytes | None = None
    release = ""
    modules: dict[str, bytes] = {}
    names = "|".join(MODULES)
    module_re = re.compile(
        r"\./(?:usr/)?lib/modules/([^/]+)/kernel/.*/(" + names + r")\.ko(\.xz|\.zst|\.gz)?"
    )
    proc = subprocess.Popen(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name if member.name.startswith("./") else "./" + member.name
                boot = re.fullmatch(r"\./boot/vmlinuz-(.+)", name)
                mod = module_re.fullmatch(name)
                if boot is None and mod is None:
                    continue
                handle = tar.extractfile(member)
                assert handle is not None
                data = handle.read()
                if boot is not None:
                    kernel, release = data, boot.group(1)
                elif mod is not None:
                    modules[mod.group(2)] = _decompress(data, mod.group(3) or "")
                if kernel is not None and len(modules) == len(MODULES):
                    break
    except (tarfile.TarError, OSError, lzma.LZMAError, zstandard.ZstdError) as err:
        raise QemuError(f"reading {deb.name}: {err}") from err
    finally:
        proc.stdout.close()
        proc.kill()
        proc.wait()
    missing = sorted(set(MODULES) - set(modules))
    if kernel is None or missing:
        raise QemuError(f"{deb.name} lacks {'vmlinuz' if kernel is None else missing}")
    return kernel, release, modules


def _decompress(data: bytes, suffix: str) -> bytes:
    if suffix == ".xz":
        return lzma.decompress(data)
    if suffix == ".zst":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if suffix == ".gz":
        return gzip.decompress(data)
    return data


def _compile_workload(out: Path) -> bytes:
    target = out / "xmig-workload"
    _run(["gcc", "-static", "-O2", "-s", "-Wall", "-o", str(target), str(WORKLOAD_SOURCE)])
    return target.read_bytes()


def _initramfs(modules: Mapping[str, bytes], workload: bytes) -> bytes:
    cpio = Cpio()
    for folder in ("bin", "dev", "lib", "lib/modules", "proc", "sys", "tmp", "root"):
        cpio.directory(folder)
    cpio.node("dev/console", 0o600, major=5, minor=1)
    cpio.node("dev/ttyS0", 0o600, major=4, minor=64)
    cpio.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("bin/xmig-workload", workload, 0o755)
    for name in MODULES:
        cpio.file(f"lib/modules/{name}.ko", modules[name], 0o644)
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Cpio:
    """A cpio archive in the "newc" format the kernel unpacks as initramfs (mtime 0, uid 0)."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, 0o040000 | mode, b"", nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def node(self, name: str, mode: int, *, major: int, minor: int) -> None:
        """A character device node."""
        self._entry(name, 0o020000 | mode, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"", nlink=1, ino=0)
        return self._buf.getvalue()

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes,
        *,
        nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
        ino: int | None = None,
    ) -> None:
        raw = name.encode() + b"\0"
        if ino is None:
            ino, self._ino = self._ino, self._ino + 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0)
        header = b"070701" + b"".join(b"%08x" % value for value in fields)
        self._buf.write(header + raw)
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))


def main(argv: list[str] | None = None) -> int:
    """``python -m xmig.guest.qemu.image BUILD_DIR [--force]``: build, print the image as JSON."""
    args = sys.argv[1:] if argv is None else argv
    force = "--force" in args
    rest = [a for a in args if a != "--force"]
    if len(rest) != 1:
        print("usage: python -m xmig.guest.qemu.image BUILD_DIR [--force]", file=sys.stderr)
        return 2
    try:
        image = build_test_guest(rest[0], force=force)
    except QemuError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "kernel": str(image.kernel),
                "initrd": str(image.initrd),
                "kernel_package": image.kernel_package,
                "kernel_version": image.kernel_version,
                "kernel_release": image.kernel_release,
                "cached": image.cached,
                "build_s": round(image.build_s, 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
