"""Run commands inside a throwaway QEMU guest whose kernel has device-mapper (dm-thin).

This host's kernel has loop devices but no device-mapper, and nested KVM does not work,
so dm-thin code is tested in a TCG-emulated guest running Debian's stock kernel
(see /work/shared/docs/real-kernel.md for what was measured):

* `ensure_assets()` fetches that kernel with `apt-get download` + `dpkg -x` into a cache
  folder (no /boot changes, no initramfs-tools) and builds a small busybox initramfs
  holding the modules the guest needs (virtio, 9p, dm-thin, loop, ext4), decompressed and
  listed in dependency order, plus /init (tests/vm/init.sh).
* `run_in_guest()` / `start_guest()` boot it. The host's root filesystem is shared
  read-only over 9p and chrooted into, so the guest runs the host's Python, venv and
  checkout at the same paths. `share_dir` is a second, writable 9p share mounted at the
  SAME absolute path; whatever must outlive the guest (pool backing files, images.db)
  belongs there. Killing QEMU (`RunningGuest.kill()`) is a faithful power cut.

    result = run_in_guest(["dmsetup", "targets"], share_dir=tmp_path, timeout=180)
    assert result.returncode == 0, result.output
"""

from __future__ import annotations

import codecs
import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "FLYIO_VM_CACHE"
DEFAULT_CACHE = Path("/var/cache/flyio-vm")
METAPACKAGE = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")
INIT_SCRIPT = Path(__file__).with_name("init.sh")
REPO = Path(__file__).resolve().parents[2]
APT_LISTS = Path("/var/lib/apt/lists")

# Bump when the initramfs layout changes in a way the inputs below do not capture.
INITRAMFS_FORMAT = 2

# What the guest loads (real-kernel.md); their dependencies are found with modinfo and
# loaded first. crc32c_generic comes first on purpose: libcrc32c, jbd2 and ext4 reach it
# through the crypto API (request_module), which modinfo's `depends` cannot see and which
# has no modprobe to call in the initramfs. dm-flakey and dm-delay are for fault injection.
WANTED_MODULES: tuple[str, ...] = (
    "crc32c_generic",
    "virtio_pci", "9pnet_virtio", "9p",
    "dm-thin-pool", "dm-flakey", "dm-delay",
    "loop",
    "ext4",
)

# The guest's command sees these unless `env` overrides them. The host root is read-only
# in the guest: HOME and caches go to the guest's tmpfs, pytest must not try to write
# .pytest_cache into the checkout, and Python output must not sit in a buffer when QEMU
# is killed.
BASE_GUEST_ENV: dict[str, str] = {
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    "PYTEST_ADDOPTS": "-p no:cacheprovider",
}
PASSTHROUGH_ENV = ("PYENV_ROOT", "PYENV_VERSION", "VIRTUAL_ENV")
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")

RUNS_DIR = ".flyio-vm"  # per-run folders inside the share
BEGIN_MARKER = "FLYIO-VM-BEGIN"
EXIT_MARKER = "FLYIO-VM-EXIT"
FAIL_MARKER = "FLYIO-VM-FAIL"
# Paths end up on the kernel command line, split on spaces by init.sh: allow only these.
SAFE_PATH = re.compile(r"^/[A-Za-z0-9._@+/-]*$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# SeaBIOS/terminal escape sequences (ESC c, CSI ... letter) carry no text.
ESCAPES = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|[A-Za-z])")


class VmError(RuntimeError):
    """The guest could not be prepared or started."""


class AssetsUnavailable(VmError):
    """The kernel, QEMU or busybox could not be obtained (not root, no network, no apt)."""


class VmCommandError(VmError):
    """A host command the harness ran failed or timed out; carries its stderr."""

    def __init__(self, argv: Sequence[str], detail: str) -> None:
        self.argv = tuple(argv)
        super().__init__(f"{shlex.join(argv)}: {detail}")


# --------------------------------------------------------------------------- host commands


def _run(argv: Sequence[str], *, timeout: float, cwd: Path | None = None) -> str:
    """Run `argv` (never through a shell); return stdout, raise VmCommandError with stderr."""
    try:
        done = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise VmCommandError(argv, f"timed out after {timeout:g}s: {stderr.strip()[-2000:]}") from None
    except FileNotFoundError:
        raise VmCommandError(argv, "command not found") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()[-2000:]
        raise VmCommandError(argv, f"exited {done.returncode}: {detail}")
    return done.stdout


# --------------------------------------------------------------------------- assets


@dataclass(frozen=True)
class VmAssets:
    """A bootable kernel + initramfs pair from the cache."""

    kernel_version: str  # e.g. "6.1.0-56-amd64"
    kernel: Path  # what QEMU's -kernel gets: the PVH vmlinux, else the package's vmlinuz
    initrd: Path  # gzip'd newc cpio
    modules: tuple[str, ...]  # module names in the order init.sh loads them


# Older callers spelled it this way.
GuestAssets = VmAssets


def default_cache_dir() -> Path:
    """`$FLYIO_VM_CACHE`, else /var/cache/flyio-vm."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def ensure_assets(cache_dir: Path | None = None) -> VmAssets:
    """Kernel + initramfs, reused from `cache_dir` or fetched/built now.

    Installs qemu-system-x86 and busybox-static when missing. Quick when everything is
    cached (no apt call unless the apt lists changed since the last resolution). Raises
    AssetsUnavailable when something cannot be obtained.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AssetsUnavailable(f"cannot create the VM cache {cache}: {exc}") from None
    # One builder at a time: parallel test sessions share the cache.
    with _locked(cache / ".lock"):
        ensure_host_tools()
        version = resolve_kernel_version(cache)
        tree = ensure_kernel_tree(cache, version)
        assets = ensure_initramfs(cache, tree, version)
        return dataclasses.replace(assets, kernel=ensure_pvh_kernel(tree, version))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_host_tools() -> None:
    """qemu-system-x86 and busybox-static, installed with apt-get only when missing."""
    if shutil.which("qemu-system-x86_64") and is_static_elf(BUSYBOX):
        return
    if os.geteuid() != 0:
        raise AssetsUnavailable("qemu-system-x86/busybox-static are missing and installing them needs root")
    argv = ["apt-get", "install", "-y", "--no-install-recommends", "qemu-system-x86", "busybox-static"]
    try:
        _run(argv, timeout=900)
    except VmCommandError as exc:
        raise AssetsUnavailable(str(exc)) from None
    if not (shutil.which("qemu-system-x86_64") and is_static_elf(BUSYBOX)):
        raise AssetsUnavailable(f"after apt-get install, qemu-system-x86_64 or a static {BUSYBOX} is still missing")


def is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a PT_INTERP header (needs no dynamic loader,
    so it runs in the initramfs, which has no libc)."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(64)
            if header[:5] != b"\x7fELF\x02":  # 64-bit ELF only (we build for x86-64)
                return False
            phoff, = struct.unpack_from("<Q", header, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
            handle.seek(phoff)
            table = handle.read(phentsize * phnum)
    except OSError:
        return False
    pt_interp = 3
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != pt_interp for i in range(phnum))


def resolve_kernel_version(cache: Path) -> str:
    """The ABI name `linux-image-amd64` depends on (e.g. 6.1.0-56-amd64).

    apt-cache takes about a second here (no pkgcache.bin), so the answer is remembered
    next to the apt lists' mtime and asked again only after an `apt-get update`.
    """
    stamp = cache / "kernel-version.json"
    lists_mtime = APT_LISTS.stat().st_mtime_ns if APT_LISTS.exists() else 0
    try:
        saved = json.loads(stamp.read_text())
        if saved.get("lists_mtime_ns") == lists_mtime and saved.get("version"):
            return str(saved["version"])
    except (OSError, ValueError):
        pass
    version = _ask_apt_for_kernel_version()
    _write_atomically(stamp, json.dumps({"lists_mtime_ns": lists_mtime, "version": version}).encode())
    return version


def _ask_apt_for_kernel_version() -> str:
    pattern = re.compile(r"\blinux-image-(\d\S*-amd64)\b")
    try:
        found = pattern.search(_run(["apt-cache", "depends", METAPACKAGE], timeout=120))
        if not found:
            # Older apt prints alternatives differently; the candidate's Depends field is the truth.
            show = _run(["apt-cache", "show", "--no-all-versions", METAPACKAGE], timeout=120)
            found = pattern.search("\n".join(line for line in show.splitlines() if line.startswith("Depends:")))
    except VmCommandError as exc:
        raise AssetsUnavailable(f"cannot resolve {METAPACKAGE}: {exc}") from None
    if not found:
        raise AssetsUnavailable(f"{METAPACKAGE} depends on no linux-image-*-amd64 package (run apt-get update?)")
    return found.group(1)


def ensure_kernel_tree(cache: Path, version: str) -> Path:
    """`<cache>/kernel-<version>`: the package unpacked with `dpkg -x` (boot/ + lib/modules/)."""
    tree = cache / f"kernel-{version}"
    if (tree / "boot" / f"vmlinuz-{version}").exists() and (tree / "lib" / "modules" / version).is_dir():
        return tree
    deb = _download_kernel_package(cache, version)
    partial = cache / f"kernel-{version}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    _run(["dpkg", "-x", str(deb), str(partial)], timeout=600)
    shutil.rmtree(tree, ignore_errors=True)
    partial.rename(tree)  # atomic: a half-unpacked tree never looks complete
    return tree


def _download_kernel_package(cache: Path, version: str) -> Path:
    package = f"linux-image-{version}"
    debs = sorted(cache.glob(f"{package}_*_amd64.deb"))
    if not debs:
        try:
            # apt-get download writes into its working directory.
            _run(["apt-get", "download", package], timeout=1800, cwd=cache)
        except VmCommandError as exc:
            raise AssetsUnavailable(f"cannot download {package}: {exc}") from None
        debs = sorted(cache.glob(f"{package}_*_amd64.deb"))
    if not debs:
        raise AssetsUnavailable(f"apt-get download {package} left no .deb in {cache}")
    return debs[-1]


def ensure_pvh_kernel(tree: Path, version: str) -> Path:
    """The kernel QEMU boots: `vmlinux-<version>` unpacked from the bzImage when possible.

    Under TCG the bzImage's own xz decompressor takes 5-8 s of every boot; QEMU boots an
    uncompressed ELF vmlinux directly through its PVH entry point (CONFIG_PVH, on in
    Debian's kernel), so we decompress it once here. Falls back to the bzImage when the
    payload is not xz/gzip or the ELF has no PVH entry note.
    """
    bzimage = tree / "boot" / f"vmlinuz-{version}"
    vmlinux = tree / "boot" / f"vmlinux-{version}"
    if vmlinux.exists():
        return vmlinux
    elf = bzimage_payload(bzimage.read_bytes())
    if elf is None or not has_pvh_entry(elf):
        return bzimage
    _write_atomically(vmlinux, elf)
    return vmlinux


def bzimage_payload(image: bytes) -> bytes | None:
    """The decompressed vmlinux ELF inside a bzImage, or None if it is not xz or gzip.
    The boot protocol header (>= 2.08) says where the compressed payload lies."""
    if image[0x202:0x206] != b"HdrS" or struct.unpack_from("<H", image, 0x206)[0] < 0x208:
        return None
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = image[start:start + length]
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            # A 4-byte size trailer follows the stream: the decompressor object ignores it.
            data = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        elif payload.startswith(b"\x1f\x8b"):
            data = zlib.decompressobj(wbits=31).decompress(payload)
        else:
            return None
    except (lzma.LZMAError, zlib.error):
        return None
    return data if data.startswith(b"\x7fELF\x02") else None


def has_pvh_entry(elf: bytes) -> bool:
    """True when a PT_NOTE of the 64-bit ELF holds XEN_ELFNOTE_PHYS32_ENTRY (type 18,
    owner "Xen"): the entry point QEMU's PVH loader needs."""
    pt_note, xen_phys32_entry = 4, 18
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", elf, phoff + i * phentsize)
        if p_type != pt_note:
            continue
        p_offset, = struct.unpack_from("<Q", elf, phoff + i * phentsize + 8)
        p_filesz, = struct.unpack_from("<Q", elf, phoff + i * phentsize + 32)
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, n_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and n_type == xen_phys32_entry:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _normal(name: str) -> str:
    """Module names treat - and _ alike (dm-mod is dm_mod)."""
    return name.replace("-", "_")


def _module_name(path: Path) -> str:
    return _normal(re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", path.name))


def module_files(modules_dir: Path) -> dict[str, Path]:
    """Every loadable module of the tree, by normalized name."""
    return {_module_name(p): p for p in (modules_dir / "kernel").rglob("*.ko*")}


def builtin_modules(modules_dir: Path) -> set[str]:
    """Modules compiled into the kernel (nothing to load)."""
    listing = modules_dir / "modules.builtin"
    if not listing.exists():
        return set()
    return {_module_name(Path(line)) for line in listing.read_text().split()}


def module_depends(path: Path) -> list[str]:
    """What `path` needs loaded first, from its .modinfo section (`modinfo -F depends`)."""
    out = _run(["modinfo", "-F", "depends", str(path)], timeout=30).strip()
    return [_normal(name) for name in out.split(",") if name]


def module_load_order(modules_dir: Path, wanted: Sequence[str] = WANTED_MODULES) -> list[tuple[str, Path]]:
    """(name, file) of `wanted` and all they depend on, each after its dependencies.

    Built-in modules are skipped; a module that is neither a file nor built in is an error
    (the guest would fail later in a far less readable way).
    """
    files = module_files(modules_dir)
    builtin = builtin_modules(modules_dir)
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in files:
            if name in builtin:
                return
            raise VmError(f"kernel module {name} is neither in {modules_dir} nor built in")
        for dependency in module_depends(files[name]):
            visit(dependency)
        order.append((name, files[name]))

    for name in wanted:
        visit(_normal(name))
    return order


def read_module(path: Path) -> bytes:
    """The module's ELF bytes. Debian may ship .ko.xz (or .zst); busybox insmod is not
    reliably built with decompression, so the initramfs gets plain .ko files."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        argv = ["zstd", "-d", "-c", str(path)]
        try:
            return subprocess.run(argv, capture_output=True, timeout=60, check=True).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            raise VmError(f"cannot decompress {path} with zstd: {exc}") from None
    return data


def initramfs_key(version: str) -> str:
    """What the initramfs is built from: a change in any of these means a rebuild."""
    digest = hashlib.sha256()
    for part in (str(INITRAMFS_FORMAT), version, repr(WANTED_MODULES)):
        digest.update(part.encode() + b"\0")
    digest.update(INIT_SCRIPT.read_bytes())
    digest.update(BUSYBOX.read_bytes())
    return digest.hexdigest()[:16]


def ensure_initramfs(cache: Path, tree: Path, version: str) -> VmAssets:
    """The initramfs for this kernel, init.sh and busybox: reused if built, else built."""
    key = initramfs_key(version)
    initrd = cache / f"initramfs-{version}-{key}.img"
    manifest = initrd.with_suffix(".json")  # written last: its presence means complete
    kernel = tree / "boot" / f"vmlinuz-{version}"
    try:
        modules = tuple(json.loads(manifest.read_text())["modules"])
        if initrd.exists():
            return VmAssets(version, kernel, initrd, modules)
    except (OSError, ValueError, KeyError):
        pass
    order = module_load_order(tree / "lib" / "modules" / version)
    _write_atomically(initrd, build_initramfs(order))
    _write_atomically(manifest, json.dumps({"modules": [name for name, _ in order]}).encode())
    prune_initramfs(cache, keep=initrd)
    return VmAssets(version, kernel, initrd, tuple(name for name, _ in order))


def prune_initramfs(cache: Path, keep: Path, min_age: float = 600.0) -> None:
    """Remove initramfs images (and manifests) other than `keep`, built before init.sh or
    busybox last changed. Only those older than `min_age` seconds: a test session that
    started before the change may be about to boot the one it resolved (QEMU reads the
    file once, at start, so a running guest does not care)."""
    now = time.time()
    for path in cache.glob("initramfs-*"):
        if path.stem == keep.stem or not path.name.endswith((".img", ".json")):
            continue
        try:
            if now - path.stat().st_mtime > min_age:
                path.unlink()
        except OSError:
            pass  # another session pruned it first


def build_initramfs(order: Sequence[tuple[str, Path]]) -> bytes:
    """gzip'd newc cpio: busybox, /init, /modules/NAME.ko and /modules/order."""
    archive = CpioWriter()
    for directory in ("bin", "dev", "proc", "sys", "host", "modules"):
        archive.directory(directory)
    # The kernel opens /dev/console for PID 1 before anything is mounted.
    archive.char_device("dev/console", 5, 1)
    archive.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    archive.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    for name, path in order:
        archive.file(f"modules/{name}.ko", read_module(path))
    archive.file("modules/order", "".join(f"{name}\n" for name, _ in order).encode())
    # mtime=0: the same inputs give the same bytes.
    return gzip.compress(archive.finish(), compresslevel=6, mtime=0)


class CpioWriter:
    """A minimal `newc` cpio writer: what the kernel unpacks as an initramfs. Written in
    Python rather than piping `find | cpio` so /dev/console needs no mknod (no root) and
    the archive is byte-for-byte reproducible."""

    def __init__(self) -> None:
        self._buffer = io.BytesIO()
        self._inode = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        fields = (self._inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._inode += 1
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._buffer.write(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self._buffer.write(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._buffer.getvalue()


def _write_atomically(target: Path, data: bytes) -> None:
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    partial.rename(target)


# --------------------------------------------------------------------------- the guest


@dataclass(frozen=True)
class GuestResult:
    """How a guest run ended.

    returncode is the command's exit code from the marker line; None when there was none
    (timed out, killed, guest crashed, or the guest's setup failed: see `guest_error`).
    """

    returncode: int | None
    output: str  # the whole serial console, escape sequences and \r removed
    timed_out: bool
    wall_seconds: float  # QEMU start to QEMU exit
    boot_seconds: float | None = None  # QEMU start to the command's start
    guest_error: str | None = None  # init.sh's reason when it could not run the command
    qemu_returncode: int | None = None

    @property
    def command_output(self) -> str:
        """Only what the command printed (and kernel messages meanwhile)."""
        return command_section(self.output)


def command_section(console: str) -> str:
    """The console text between the begin and exit markers."""
    begin = console.find(f"{BEGIN_MARKER} ")
    if begin < 0:
        return ""
    start = console.find("\n", begin) + 1
    end = console.find(f"{EXIT_MARKER} ", start)
    if end < 0:
        return console[start:]
    # init.sh starts the marker with a newline of its own: drop it.
    return console[start:end - 1] if console[end - 1:end] == "\n" else console[start:end]


def clean_console(text: str) -> str:
    """Serial console text without \r (the tty's ONLCR) and terminal escape sequences."""
    return ESCAPES.sub("", text.replace("\r", ""))


def guest_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The command's environment: BASE_GUEST_ENV, the host's PATH (with the checkout's
    .venv/bin first when there is one, and the sbin directories dmsetup lives in) and a
    few pyenv/venv variables, then `env` on top."""
    result = dict(BASE_GUEST_ENV)
    path = [p for p in os.environ.get("PATH", "/usr/bin:/bin").split(":") if p]
    venv_bin = REPO / ".venv" / "bin"
    if venv_bin.is_dir():
        path = [str(venv_bin)] + [p for p in path if p != str(venv_bin)]
        result["VIRTUAL_ENV"] = str(venv_bin.parent)
    path += [d for d in SBIN_DIRS if d not in path]
    result["PATH"] = ":".join(path)
    for name in PASSTHROUGH_ENV:
        if name in os.environ and name not in result:
            result[name] = os.environ[name]
    result.update(env or {})
    return result


def command_script(argv: Sequence[str], env: Mapping[str, str], cwd: str, nonce: str) -> str:
    """The /bin/sh script the guest runs. Every value is shlex-quoted; names are checked."""
    if not argv:
        raise ValueError("empty command")
    lines = ["#!/bin/sh", f"# written by tests/vm/harness.py for guest run {nonce}"]
    for name, value in env.items():
        if not ENV_NAME.match(name):
            raise ValueError(f"not a valid environment variable name: {name!r}")
        lines.append(f"export {name}={shlex.quote(value)}")
    lines.append(f"cd {shlex.quote(cwd)} || exit 125")
    # No stdin in the guest: a command that reads it gets EOF instead of hanging.
    lines.append(f"exec {shlex.join(argv)} </dev/null")
    return "\n".join(lines) + "\n"


def _safe_share(share_dir: Path | str) -> Path:
    share = Path(share_dir).resolve()
    if not share.is_dir():
        raise ValueError(f"share_dir {share} is not a directory")
    if not SAFE_PATH.match(str(share)) or share == Path("/"):
        raise ValueError(f"share_dir {share}: only [A-Za-z0-9._@+/-] may appear in it (it goes on the kernel command line)")
    if share.parts[1] in ("proc", "sys", "dev", "run"):
        raise ValueError(f"share_dir {share} would be hidden by the guest's own /{share.parts[1]}")
    return share


def qemu_command(assets: VmAssets, *, share: Path, script: Path, nonce: str, memory_mb: int = 1024,
                 cpus: int = 2, root_cache: str = "loose", share_cache: str = "mmap") -> list[str]:
    """The QEMU argv real-kernel.md measured: TCG, serial console on stdio, two 9p shares."""
    append = " ".join([
        "console=ttyS0", "quiet", "panic=-1",
        # Nothing to mitigate in a throwaway guest, and TCG pays dearly for each mitigation.
        "mitigations=off",
        f"flyio.run={nonce}", f"flyio.share={share}", f"flyio.script={script}",
        f"flyio.rootcache={root_cache}", f"flyio.sharecache={share_cache}",
        f"flyio.repo={REPO}",  # kept visible if it lies under the guest's tmpfs /tmp or /run
    ])
    return [
        "qemu-system-x86_64",
        "-accel", "tcg,thread=multi", "-cpu", "max", "-m", str(memory_mb), "-smp", str(cpus),
        "-nographic", "-no-reboot",
        # No default NIC/VGA/floppy (their option ROMs and probing cost boot time) and no
        # monitor on stdio: the console is the only thing there.
        "-nodefaults", "-serial", "stdio", "-monitor", "none",
        "-kernel", str(assets.kernel), "-initrd", str(assets.initrd), "-append", append,
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={share},mount_tag=share,security_model=passthrough,multidevs=remap",
    ]


class RunningGuest:
    """A booting or running guest. Its console accumulates in `.output`; `.kill()` is a
    power cut; `.wait()` ends it (SIGKILL past the timeout) and gives a GuestResult."""

    def __init__(self, argv: list[str], *, nonce: str, run_dir: Path,
                 on_output: Callable[[str], None] | None = None) -> None:
        self.nonce = nonce
        self.run_dir = run_dir
        self.started = time.monotonic()
        self.boot_seconds: float | None = None
        self.ended: float | None = None
        self._raw: list[str] = []
        self._tail = ""
        self._lock = threading.Lock()
        self._on_output = on_output
        # QEMU runs for a while and its console must be read as it runs: Popen, not run().
        # Own session, so the SIGKILL reaches QEMU's whole process group and nothing else.
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self._reader = threading.Thread(target=self._read, name=f"qemu-console-{nonce}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stream = self.process.stdout
        # Popen's default buffering gives a BufferedReader: read1 returns what is there
        # instead of waiting for a full buffer, so the console streams live.
        assert isinstance(stream, io.BufferedReader)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""  # a chunk may end inside an escape sequence: hold that back
        while chunk := stream.read1(65536):
            text = pending + decoder.decode(chunk)
            cut = text.rfind("\x1b")
            if cut >= 0 and not ESCAPES.match(text, cut):
                text, pending = text[:cut], text[cut:]
            else:
                pending = ""
            self._append(text)
        self._append(pending + decoder.decode(b"", final=True))
        self.ended = time.monotonic()

    def _append(self, text: str) -> None:
        if not text:
            return
        with self._lock:
            self._raw.append(text)
            if self.boot_seconds is None:
                # QEMU's serial backend often delivers one byte per read: look at a tail.
                self._tail = (self._tail + text)[-256:]
                if f"{BEGIN_MARKER} {self.nonce}" in self._tail:
                    self.boot_seconds = time.monotonic() - self.started
        if self._on_output is not None:
            self._on_output(clean_console(text))

    @property
    def output(self) -> str:
        """The console so far (cleaned)."""
        with self._lock:
            return clean_console("".join(self._raw))

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def returncode(self) -> int | None:
        """The command's exit code, once its marker line was printed."""
        found = re.findall(rf"^{EXIT_MARKER} {self.nonce} (\d+)$", self.output, re.MULTILINE)
        return int(found[-1]) if found else None

    def guest_error(self) -> str | None:
        """init.sh's reason, when it could not get as far as running the command."""
        found = re.findall(rf"^{FAIL_MARKER} {self.nonce} (.*)$", self.output, re.MULTILINE)
        return found[-1] if found else None

    def wait_for_path(self, path: Path | str, timeout: float, interval: float = 0.1) -> bool:
        """Wait until `path` exists on the host (the guest wrote it to the share).
        False when the guest ended first or `timeout` passed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.lexists(path):
                return True
            if not self.running:
                return os.path.lexists(path)
            time.sleep(interval)
        return False

    def wait_for_output(self, text: str, timeout: float, interval: float = 0.05) -> bool:
        """Wait until `text` appears on the console. False when the guest ended first or
        `timeout` passed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output:
                return True
            if not self.running:
                self._reader.join(timeout=10)
                return text in self.output
            time.sleep(interval)
        return False

    def wait(self, timeout: float) -> GuestResult:
        """Wait until the guest powers off; past `timeout` seconds (counted from now)
        SIGKILL QEMU and report timed_out."""
        timed_out = False
        try:
            self.process.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            self.kill()
        return self._result(timed_out)

    def kill(self) -> None:
        """Power cut: SIGKILL QEMU. Nothing in the guest is flushed, unmounted or detached;
        what the guest had written to the share (cache=none) is on the host."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        self._finish()

    def _finish(self) -> None:
        self._reader.join(timeout=10)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        try:
            self.run_dir.parent.rmdir()  # the share's .flyio-vm, when no other run uses it
        except OSError:
            pass

    def _result(self, timed_out: bool) -> GuestResult:
        self._finish()
        end = self.ended or time.monotonic()
        return GuestResult(
            returncode=None if timed_out else self.returncode(),
            output=self.output,
            timed_out=timed_out,
            wall_seconds=end - self.started,
            boot_seconds=self.boot_seconds,
            guest_error=self.guest_error(),
            qemu_returncode=self.process.returncode,
        )

    def __enter__(self) -> RunningGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


ROOT_CACHES = ("loose", "none")
SHARE_CACHES = ("mmap", "none")


def start_guest(argv: Sequence[str], *, share_dir: Path | str, memory_mb: int = 1024, cpus: int = 2,
                env: Mapping[str, str] | None = None, cwd: str | None = None, root_cache: str = "loose",
                share_cache: str = "mmap", on_output: Callable[[str], None] | None = None,
                assets: VmAssets | None = None) -> RunningGuest:
    """Boot a guest that runs `argv` chrooted in the host's root, in `cwd` (default: the
    current directory), with guest_env(env); it powers off when the command ends.

    root_cache: 9p cache of the read-only host root. "loose" (default) caches it in the
    guest: Python imports are several times faster, but a host file changed while the
    guest runs may be seen stale. "none" reads everything through (real-kernel.md's mount).
    share_cache: "mmap" (default) is cache=none plus shared writable mmap, which SQLite's
    WAL needs; "none" is the plain mount (WAL databases then fail with "disk I/O error").
    on_output: receives the console text as it arrives (called from a reader thread).
    """
    if root_cache not in ROOT_CACHES:
        raise ValueError(f"root_cache must be one of {ROOT_CACHES}, not {root_cache!r}")
    if share_cache not in SHARE_CACHES:
        raise ValueError(f"share_cache must be one of {SHARE_CACHES}, not {share_cache!r}")
    share = _safe_share(share_dir)
    assets = assets or ensure_assets()
    nonce = uuid.uuid4().hex[:12]
    run_dir = share / RUNS_DIR / nonce
    run_dir.mkdir(parents=True)
    script = run_dir / "command.sh"
    script.write_text(command_script(argv, guest_env(env), cwd or os.getcwd(), nonce))
    qemu = qemu_command(assets, share=share, script=script, nonce=nonce, memory_mb=memory_mb, cpus=cpus,
                        root_cache=root_cache, share_cache=share_cache)
    try:
        return RunningGuest(qemu, nonce=nonce, run_dir=run_dir, on_output=on_output)
    except OSError as exc:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise VmError(f"cannot start QEMU: {exc}") from None


def run_in_guest(argv: Sequence[str], *, share_dir: Path | str, timeout: float, memory_mb: int = 1024,
                 cpus: int = 2, env: Mapping[str, str] | None = None, cwd: str | None = None,
                 root_cache: str = "loose", share_cache: str = "mmap",
                 on_output: Callable[[str], None] | None = None) -> GuestResult:
    """Boot a guest, run `argv` in it, return its exit code and console. `timeout` covers
    boot and command; past it QEMU is SIGKILLed and the result says timed_out.
    The other arguments are start_guest's."""
    guest = start_guest(argv, share_dir=share_dir, memory_mb=memory_mb, cpus=cpus, env=env, cwd=cwd,
                        root_cache=root_cache, share_cache=share_cache, on_output=on_output)
    with guest:
        return guest.wait(timeout)


__all__ = [
    "AssetsUnavailable", "GuestAssets", "GuestResult", "RunningGuest", "VmAssets", "VmCommandError", "VmError",
    "default_cache_dir", "ensure_assets", "run_in_guest", "start_guest",
]
