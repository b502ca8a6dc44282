"""The guest's kernel and initramfs, fetched and built on demand and cached.

The kernel is Debian's stock `linux-image-<ver>-amd64` (the version the
`linux-image-amd64` metapackage depends on), unpacked with `dpkg -x` so /boot and the
host's initramfs tooling are never touched. The initramfs is a few hundred kilobytes:
busybox-static, the modules real-kernel.md lists (virtio + 9p + dm-thin + loop + ext4,
with their dependencies in load order) and an /init that mounts the host's root over
9p and chroots into it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from support.errors import ManagerError
from support.proc import run_command

CACHE_ENV = "FLYIO_VM_CACHE"
DEFAULT_CACHE = "/var/cache/flyio-vm"
METAPACKAGE = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")

# What the guest must load; dependencies come from modules.dep. crc32c_generic is
# needed by ext4/jbd2 and libcrc32c through the crypto API, which modules.dep cannot see.
WANTED_MODULES = (
    "virtio_pci", "9pnet_virtio", "9p", "crc32c_generic", "dm-thin-pool", "dm-flakey", "loop", "ext4",
)


class AssetsUnavailable(ManagerError):
    """The kernel or the initramfs could not be obtained (no network, no apt, not root)."""


@dataclass(frozen=True)
class GuestAssets:
    kernel_version: str
    kernel: Path
    initrd: Path


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def ensure_host_tools() -> None:
    """qemu-system-x86 and busybox-static, installed when missing (scripts/setup does it too)."""
    if shutil.which("qemu-system-x86_64") and BUSYBOX.exists() and _is_static(BUSYBOX):
        return
    try:
        run_command(["apt-get", "install", "-y", "--no-install-recommends", "qemu-system-x86", "busybox-static"],
                    timeout=600)
    except ManagerError as exc:
        raise AssetsUnavailable(f"cannot install qemu-system-x86/busybox-static: {exc}") from None


def _is_static(path: Path) -> bool:
    out = run_command(["file", "-b", str(path)], timeout=10, check=False).stdout
    return "statically linked" in out or "static-pie" in out


def kernel_version() -> str:
    """The ABI name the metapackage depends on, e.g. `6.1.0-56-amd64`."""
    out = run_command(["apt-cache", "depends", METAPACKAGE], timeout=60, check=False).stdout
    found = re.search(r"Depends: linux-image-(\S+-amd64)\b", out)
    if not found:
        raise AssetsUnavailable(f"cannot resolve {METAPACKAGE}'s kernel (apt-cache depends said: {out.strip()[:200]!r})")
    return found.group(1)


def ensure_kernel(cache: Path, version: str) -> Path:
    """The unpacked kernel tree `<cache>/kernel-<version>` (vmlinuz + modules + modules.dep)."""
    tree = cache / f"kernel-{version}"
    if (tree / "lib" / "modules" / version / "modules.dep").exists():
        return tree
    package = f"linux-image-{version}"
    debs = sorted(cache.glob(f"{package}_*_amd64.deb"))
    if not debs:
        try:
            run_command(["sh", "-c", f'cd "$1" && exec apt-get download {package}', "sh", str(cache)], timeout=900)
        except ManagerError as exc:
            raise AssetsUnavailable(f"cannot download {package}: {exc}") from None
        debs = sorted(cache.glob(f"{package}_*_amd64.deb"))
    if not debs:
        raise AssetsUnavailable(f"apt-get download {package} left no .deb in {cache}")
    partial = cache / f"kernel-{version}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    run_command(["dpkg", "-x", str(debs[-1]), str(partial)], timeout=600)
    # The package ships no modules.dep (depmod runs at install time); make one here.
    run_command(["depmod", "-b", str(partial), version], timeout=120)
    shutil.rmtree(tree, ignore_errors=True)
    partial.rename(tree)
    return tree


def _normal(name: str) -> str:
    return name.replace("-", "_")


def _module_name(relpath: str) -> str:
    base = relpath.rsplit("/", 1)[-1]
    return _normal(re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", base))


def modules_in_load_order(modules_dir: Path, wanted: tuple[str, ...] = WANTED_MODULES) -> list[str]:
    """Relative paths of `wanted` and everything they need, each after its dependencies.
    A module absent from modules.dep is built into the kernel and is skipped."""
    deps: dict[str, list[str]] = {}
    paths: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        paths[_module_name(mod)] = mod
        deps[_module_name(mod)] = [_module_name(d) for d in rest.split()]
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name not in paths:
            return
        seen.add(name)
        for dep in deps[name]:
            visit(dep)
        order.append(paths[name])

    for name in wanted:
        visit(_normal(name))
    return order


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        raise AssetsUnavailable(f"{path.name}: zstd-compressed modules are not supported")
    return data


INIT_SCRIPT = r"""#!/bin/busybox sh
# PID 1 of the test guest: modules, host root over 9p (read-only), the writable share at
# the same path as on the host, then chroot and run the command script named on the
# kernel command line. The exit code is printed as a marker line the host looks for.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r mod; do insmod "/modules/$mod" || echo "flyio-guest: insmod $mod failed"; done < /modules.order
ip link set lo up
share=""; script=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    flyio.share=*) share="${arg#flyio.share=}" ;;
    flyio.script=*) script="${arg#flyio.script=}" ;;
  esac
done
R=/host
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot $R || { echo "FLYIO-GUEST-EXIT=254"; poweroff -f; }
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
mount -t tmpfs tmpfs $R/tmp
mount -t tmpfs tmpfs $R/run
mkdir -p "$R$share" && mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=mmap share "$R$share" \
  || { echo "FLYIO-GUEST-EXIT=253"; poweroff -f; }
chroot $R /bin/sh "$script"
rc=$?
echo; echo "FLYIO-GUEST-EXIT=$rc"
sync
poweroff -f
"""


class _Cpio:
    """A minimal `newc` archive writer (what the kernel unpacks as an initramfs)."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()
        self.inode = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = [self.inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0]
        self.inode += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buffer.write(header + encoded)
        self.buffer.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self.buffer.write(data)
        self.buffer.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buffer.getvalue()


def build_initramfs(kernel_tree: Path, version: str, target: Path) -> None:
    """Write the gzip'd cpio initramfs to `target` (atomically)."""
    modules_dir = kernel_tree / "lib" / "modules" / version
    order = modules_in_load_order(modules_dir)
    archive = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "host", "modules"):
        archive.directory(d)
    # The kernel opens /dev/console for PID 1 before anything is mounted.
    archive.char_device("dev/console", 5, 1)
    archive.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    archive.file("init", INIT_SCRIPT.encode(), 0o755)
    names = []
    for rel in order:
        name = re.sub(r"\.(xz|zst|gz)$", "", rel.rsplit("/", 1)[-1])
        archive.file(f"modules/{name}", _read_module(modules_dir / rel))
        names.append(name)
    archive.file("modules.order", ("\n".join(names) + "\n").encode())
    partial = target.with_suffix(".partial")
    partial.write_bytes(gzip.compress(archive.finish(), compresslevel=6))
    partial.rename(target)


def ensure_assets() -> GuestAssets:
    """Kernel + initramfs, from the cache or built now (raises AssetsUnavailable)."""
    ensure_host_tools()
    cache = cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AssetsUnavailable(f"cannot create the VM cache {cache}: {exc}") from None
    version = kernel_version()
    tree = ensure_kernel(cache, version)
    # The initramfs is keyed by what goes in it, so editing /init rebuilds it.
    key = hashlib.sha256((INIT_SCRIPT + repr(WANTED_MODULES) + str(BUSYBOX.stat().st_size)).encode()).hexdigest()[:12]
    initrd = cache / f"initramfs-{version}-{key}.img"
    if not initrd.exists():
        build_initramfs(tree, version, initrd)
    return GuestAssets(kernel_version=version, kernel=tree / "boot" / f"vmlinuz-{version}", initrd=initrd)
