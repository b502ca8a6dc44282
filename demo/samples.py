"""A replica of the production bucket at a chosen scale, with the answer key.

    layers = build_families(out_dir, scale_mb=4)          # out_dir/images/<family>/<n>.tar
    upload_families(client, "bucket", out_dir)            # same keys in S3
    expected = expected_tree(family_layers("node", scale_mb=4))
    assert snapshot_tree(mounted_root) == expected

Like production: families golang, node and python of five plain ustar layers each,
layers 1-3 byte-identical across families, names like `etc/...` (no `./`), uid/gid 0,
absolute symlinks, the `usr/bin/X11 -> .` self-loop, hardlinks, a setuid binary, many
small files, some medium and a few large ones (deterministic pseudo-random bytes, partly
compressible). `scale_mb` is roughly one family's size. The extra family `whiteout`
(layer 1 shared, then whiteouts, an opaque directory and a type change) exercises the
OCI layer rules.

`expected_tree` applies the generator's own model of the layers (never the tars), so an
end-to-end test compares the unpacker against an independent answer.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import stat
import tarfile
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.log import get_logger

log = get_logger("demo.samples", component="samples")

DEFAULT_SEED = "flyio-samples-v1"
DEFAULT_SCALE_MB = 4.0
FAMILIES = ("golang", "node", "python")
WHITEOUT_FAMILY = "whiteout"
ALL_FAMILIES = (*FAMILIES, WHITEOUT_FAMILY)
MTIME = 1_700_000_000  # fixed: same seed, same bytes
BLOCK = 4096
MIB = 1024 * 1024
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"

# Directory modes shared by every layer, so a layer re-listing a parent keeps its mode.
DIR_MODES = {"tmp": 0o1777, "root": 0o700, "var/tmp": 0o1777}

# Share of `scale_mb` per layer, after the production sizes (1: 137 MB, 2: 47, 3: 179, ...).
SHARED_SHARES = {1: 0.15, 2: 0.05, 3: 0.20}
FAMILY_SHARES = {
    "golang": {4: 0.26, 5: 0.28},
    "node": {4: 0.60, 5: 0.0},  # node's 5.tar is 21 KB in production
    "python": {4: 0.60, 5: 0.02},
}


@dataclass(frozen=True)
class LayerEntry:
    """One member of a layer in the model. kind: file, dir, symlink, hardlink, whiteout, opaque."""

    path: str
    kind: str
    mode: int = 0o644
    size: int = 0
    content_key: str = ""  # seeds a file's bytes
    compressible: float = 0.5  # share of text-like blocks in the file
    target: str = ""  # symlink target, or the path a hardlink points to


@dataclass(frozen=True)
class LayerSpec:
    """A layer of the model: its name (e.g. "shared-1", "node-4") and its entries."""

    name: str
    entries: tuple[LayerEntry, ...]


@dataclass(frozen=True)
class EntrySpec:
    """What a path in a filesystem tree is: kind (file, dir, symlink, other), permission
    bits (07777), owner, and for files size, content sha256 and link count; for symlinks
    the target."""

    kind: str
    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    sha256: str | None = None
    target: str | None = None
    nlink: int | None = None


# --- content --------------------------------------------------------------------------

def _text_pool() -> bytes:
    rng = random.Random("text-pool")
    words = [
        "package", "version", "depends", "library", "config", "usr", "share", "license", "the",
        "of", "and", "copyright", "Debian", "GNU", "function", "return", "import", "module",
        "static", "const", "struct", "error", "string", "buffer", "=", "{", "}", "\n", "\t#",
    ]
    out: list[str] = []
    size = 0
    while size < 256 * 1024:
        word = rng.choice(words)
        out.append(word)
        size += len(word) + 1
    return " ".join(out).encode()


TEXT_POOL = _text_pool()


def content_blocks(key: str, size: int, compressible: float) -> Iterator[bytes]:
    """The deterministic bytes of a file, in blocks: text-like (compressible) blocks
    taken from a fixed pool and pseudo-random blocks, mixed by a rng seeded with `key`."""
    rng = random.Random(key)
    remaining = size
    while remaining:
        n = min(BLOCK, remaining)
        if rng.random() < compressible:
            start = rng.randrange(0, len(TEXT_POOL) - n)
            yield TEXT_POOL[start: start + n]
        else:
            yield rng.randbytes(n)
        remaining -= n


def content_sha256(key: str, size: int, compressible: float) -> str:
    hasher = hashlib.sha256()
    for block in content_blocks(key, size, compressible):
        hasher.update(block)
    return hasher.hexdigest()


class _ContentReader(io.RawIOBase):
    """A file object over content_blocks, for tarfile.addfile."""

    def __init__(self, entry: LayerEntry) -> None:
        self._blocks = content_blocks(entry.content_key, entry.size, entry.compressible)
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        want = size if size is not None and size >= 0 else 1 << 62
        parts = [self._buffer]
        have = len(self._buffer)
        while have < want:
            block = next(self._blocks, b"")
            if not block:
                break
            parts.append(block)
            have += len(block)
        data = b"".join(parts)
        self._buffer = data[want:]
        return data[:want]


# --- the model of each layer ------------------------------------------------------------

class _LayerBuilder:
    """Collects the entries of one layer; parent directories are added as docker does."""

    def __init__(self, name: str, seed: str) -> None:
        self.name = name
        self.rng = random.Random(f"{seed}/{name}")
        self.seed = seed
        self.entries: dict[str, LayerEntry] = {}

    def dir(self, path: str, mode: int | None = None) -> None:
        self._parents(path)
        self.entries[path] = LayerEntry(path, "dir", mode if mode is not None else DIR_MODES.get(path, 0o755))

    def file(self, path: str, size: int, *, mode: int = 0o644, compressible: float = 0.5, version: int = 0) -> None:
        self._parents(path)
        key = f"{self.seed}/{self.name}/{path}/v{version}"
        self.entries[path] = LayerEntry(path, "file", mode, size, key, compressible)

    def symlink(self, path: str, target: str) -> None:
        self._parents(path)
        self.entries[path] = LayerEntry(path, "symlink", 0o777, target=target)

    def hardlink(self, path: str, target: str) -> None:
        self._parents(path)
        self.entries[path] = LayerEntry(path, "hardlink", self.entries[target].mode, target=target)

    def whiteout(self, path: str) -> None:
        parent, _, base = path.rpartition("/")
        marker = f"{parent}/{WHITEOUT_PREFIX}{base}" if parent else f"{WHITEOUT_PREFIX}{base}"
        self._parents(marker)
        self.entries[marker] = LayerEntry(marker, "whiteout", 0o644)

    def opaque(self, directory: str) -> None:
        marker = f"{directory}/{OPAQUE_MARKER}"
        self._parents(marker)
        self.entries[marker] = LayerEntry(marker, "opaque", 0o644)

    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent not in self.entries:
                self.entries[parent] = LayerEntry(parent, "dir", DIR_MODES.get(parent, 0o755))

    def spread(self, budget: int, small_dirs: Sequence[str], medium_dirs: Sequence[str],
               large_dirs: Sequence[str], tag: str) -> None:
        """Fill `budget` bytes with the production mix: 10% of it in many small files
        (50 B - 4 KiB), 40% in medium ones (8 - 256 KiB), the rest in a few large ones."""
        rng = self.rng
        plans = ((0.10, small_dirs, 50, 4096, 0.8), (0.40, medium_dirs, 8192, 256 * 1024, 0.5),
                 (0.50, large_dirs, 512 * 1024, 8 * MIB, 0.35))
        for index, (share, dirs, low, high, compressible) in enumerate(plans):
            left = int(budget * share)
            count = 0
            while left > low // 2 and count < 50_000:
                size = min(left, rng.randint(low, max(low, min(high, budget // 3 if index == 2 else high))))
                directory = dirs[rng.randrange(len(dirs))]
                self.file(f"{directory}/{tag}{'sml'[index]}{count:05d}", size,
                          mode=0o755 if "bin" in directory else 0o644, compressible=compressible)
                left -= size
                count += 1

    def build(self) -> LayerSpec:
        # Sorted (a parent sorts before its children), hardlinks after their targets.
        plain = sorted((e for e in self.entries.values() if e.kind != "hardlink"), key=lambda e: e.path)
        links = sorted((e for e in self.entries.values() if e.kind == "hardlink"), key=lambda e: e.path)
        return LayerSpec(self.name, tuple(plain + links))


def _shared_layer(number: int, scale_mb: float, seed: str) -> LayerSpec:
    budget = int(scale_mb * MIB * SHARED_SHARES[number])
    b = _LayerBuilder(f"shared-{number}", seed)
    if number == 1:
        for d in ("etc", "etc/alternatives", "root", "tmp", "usr/bin", "usr/sbin",
                  "usr/lib/x86_64-linux-gnu", "usr/share/doc", "var/lib/dpkg/info", "var/cache/apt", "var/tmp"):
            b.dir(d)
        b.file("etc/passwd", 1200, compressible=1.0)
        b.file("etc/shadow", 700, mode=0o640, compressible=1.0)
        b.file("etc/motd", 300, compressible=1.0)
        b.file("etc/hostname", 0)
        b.file("usr/bin/passwd", 60_000, mode=0o4755)  # setuid root
        b.file("usr/bin/wall", 30_000, mode=0o2755)  # setgid
        b.file("usr/bin/gzip", 90_000, mode=0o755)
        b.hardlink("usr/bin/gunzip", "usr/bin/gzip")
        b.hardlink("usr/bin/uncompress", "usr/bin/gzip")
        b.file("usr/bin/perl5.36.0", 120_000, mode=0o755)
        b.hardlink("usr/bin/perl", "usr/bin/perl5.36.0")
        b.file("usr/bin/vim.basic", 200_000, mode=0o755)
        b.symlink("etc/alternatives/editor", "/usr/bin/vim.basic")
        b.symlink("etc/alternatives/pager", "/bin/less")  # dangling on purpose
        b.symlink("usr/bin/editor", "/etc/alternatives/editor")
        b.symlink("usr/bin/X11", ".")
        b.file("usr/lib/x86_64-linux-gnu/libz.so.1.2.13", 100_000, mode=0o644)
        b.symlink("usr/lib/x86_64-linux-gnu/libz.so.1", "libz.so.1.2.13")
        b.file("var/cache/apt/pkgcache.bin", 40_000)
        b.spread(budget, ["usr/share/doc/base", "var/lib/dpkg/info", "etc/default"],
                 ["usr/bin", "usr/lib/x86_64-linux-gnu"], ["usr/lib/x86_64-linux-gnu"], "b1")
    elif number == 2:
        # An update layer: a few files of layer 1 rewritten, new ones added.
        b.file("etc/passwd", 1300, compressible=1.0, version=2)
        b.file("usr/bin/vim.basic", 210_000, mode=0o755, version=2)
        b.dir("usr/local/bin")
        b.spread(budget, ["usr/share/doc/security", "var/lib/dpkg/info"],
                 ["usr/lib/x86_64-linux-gnu"], ["usr/lib/x86_64-linux-gnu"], "b2")
    else:
        b.file("usr/bin/gcc-12", 400_000, mode=0o755)
        b.symlink("usr/bin/gcc", "gcc-12")
        b.symlink("etc/alternatives/cc", "/usr/bin/gcc")
        b.spread(budget, ["usr/share/doc/build", "usr/include", "var/lib/dpkg/info"],
                 ["usr/lib/gcc/x86_64-linux-gnu/12", "usr/bin"], ["usr/lib/gcc/x86_64-linux-gnu/12"], "b3")
    return b.build()


def _family_layer(family: str, number: int, scale_mb: float, seed: str) -> LayerSpec:
    budget = int(scale_mb * MIB * FAMILY_SHARES[family][number])
    b = _LayerBuilder(f"{family}-{number}", seed)
    if family == "golang" and number == 4:
        b.file("usr/local/go/bin/go", 300_000, mode=0o755)
        b.symlink("usr/local/bin/go", "/usr/local/go/bin/go")
        b.spread(budget, ["usr/local/go/src/net", "usr/local/go/src/os"], ["usr/local/go/pkg/tool"],
                 ["usr/local/go/pkg/tool"], "g4")
    elif family == "golang":
        b.dir("go/src", 0o777)
        b.spread(budget, ["go/pkg/mod/cache"], ["go/pkg/mod/golang.org"], ["go/bin"], "g5")
    elif family == "node" and number == 4:
        b.file("usr/local/bin/node", 500_000, mode=0o755)
        b.file("usr/local/lib/node_modules/npm/bin/npm-cli.js", 4000, mode=0o755, compressible=1.0)
        b.symlink("usr/local/bin/npm", "../lib/node_modules/npm/bin/npm-cli.js")
        b.spread(budget, ["usr/local/lib/node_modules/npm/lib", "usr/local/lib/node_modules/npm/docs"],
                 ["usr/local/include/node"], ["usr/local/lib"], "n4")
    elif family == "node":
        b.file("app/package.json", 700, compressible=1.0)
        b.file("app/index.js", 2500, compressible=1.0)
        b.symlink("app/node_modules", "/usr/local/lib/node_modules")
    elif family == "python" and number == 4:
        b.file("usr/local/bin/python3.12", 400_000, mode=0o755)
        b.symlink("usr/local/bin/python3", "python3.12")
        b.hardlink("usr/local/bin/python", "usr/local/bin/python3.12")
        b.spread(budget, ["usr/local/lib/python3.12/email", "usr/local/lib/python3.12/json"],
                 ["usr/local/lib/python3.12/lib-dynload"], ["usr/local/lib"], "p4")
    else:
        b.file("app/requirements.txt", 300, compressible=1.0)
        b.spread(budget, ["usr/local/lib/python3.12/site-packages/app"],
                 ["usr/local/lib/python3.12/site-packages"], ["usr/local/lib/python3.12/site-packages"], "p5")
    return b.build()


def _whiteout_layers(scale_mb: float, seed: str) -> list[LayerSpec]:
    two = _LayerBuilder("whiteout-2", seed)
    two.whiteout("etc/motd")  # a file of layer 1
    two.whiteout("usr/bin/gunzip")  # one name of a hardlinked file: gzip keeps nlink 2
    two.whiteout("var/cache")  # a directory with contents
    two.opaque("usr/share/doc")  # lower contents of doc/ vanish...
    two.file("usr/share/doc/README", 500, compressible=1.0)  # ...but not what this layer adds
    three = _LayerBuilder("whiteout-3", seed)
    three.dir("etc/motd")  # once a file, now a directory
    three.file("etc/motd/welcome", 200, compressible=1.0)
    three.file("var/cache/new", 100, compressible=1.0)
    return [_shared_layer(1, scale_mb, seed), two.build(), three.build()]


def family_layers(family: str, scale_mb: float = DEFAULT_SCALE_MB, seed: str = DEFAULT_SEED) -> list[LayerSpec]:
    """The model of a family's layers, in order (1.tar first)."""
    if family == WHITEOUT_FAMILY:
        return _whiteout_layers(scale_mb, seed)
    if family not in FAMILIES:
        raise ValueError(f"unknown sample family {family!r}")
    shared = [_shared_layer(n, scale_mb, seed) for n in (1, 2, 3)]
    return shared + [_family_layer(family, n, scale_mb, seed) for n in (4, 5)]


# --- writing tars -----------------------------------------------------------------------

def _tarinfo(entry: LayerEntry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.path)
    info.mtime = MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode = entry.mode
    if entry.kind == "dir":
        info.type = tarfile.DIRTYPE
    elif entry.kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, entry.target
    elif entry.kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, entry.target
    else:  # file, whiteout, opaque: regular files (markers are empty)
        info.size = entry.size
    return info


def write_layer(spec: LayerSpec, path: Path) -> Path:
    """Write the layer as a plain POSIX ustar file (atomically: temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as archive:
        for entry in spec.entries:
            info = _tarinfo(entry)
            archive.addfile(info, _ContentReader(entry) if entry.kind == "file" else None)
    os.replace(tmp, path)
    return path


def build_families(
    out_dir: Path,
    scale_mb: float = DEFAULT_SCALE_MB,
    *,
    seed: str = DEFAULT_SEED,
    families: Sequence[str] = ALL_FAMILIES,
) -> dict[str, list[Path]]:
    """Write `out_dir/images/<family>/<n>.tar` for each family; shared layers are written
    once and hard-linked (or copied) into place. Returns the layer paths per family."""
    out_dir = Path(out_dir)
    shared_dir = out_dir / "shared"
    written: dict[str, Path] = {}
    result: dict[str, list[Path]] = {}
    for family in families:
        paths: list[Path] = []
        for number, spec in enumerate(family_layers(family, scale_mb, seed), start=1):
            target = out_dir / "images" / family / f"{number}.tar"
            if spec.name.startswith("shared-"):
                source = written.get(spec.name) or write_layer(spec, shared_dir / f"{spec.name}.tar")
                written[spec.name] = source
                _link_or_copy(source, target)
            else:
                write_layer(spec, target)
            paths.append(target)
        result[family] = paths
    log.info("sample families built", families=",".join(families), scale_mb=scale_mb, out_dir=str(out_dir))
    return result


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def upload_families(client: Any, bucket: str, out_dir: Path) -> list[str]:
    """Upload every `out_dir/images/**.tar` to `bucket` under the same key; returns the keys."""
    out_dir = Path(out_dir)
    keys: list[str] = []
    for path in sorted((out_dir / "images").rglob("*.tar")):
        key = path.relative_to(out_dir).as_posix()
        with open(path, "rb") as body:
            client.put_object(Bucket=bucket, Key=key, Body=body)
        keys.append(key)
    return keys


# --- the answer key ----------------------------------------------------------------------

@dataclass
class _Node:
    entry: LayerEntry
    inode: int


def _remove_tree(tree: dict[str, _Node], path: str) -> None:
    tree.pop(path, None)
    prefix = path + "/"
    for other in [p for p in tree if p.startswith(prefix)]:
        del tree[other]


def expected_tree(layers: Sequence[LayerSpec]) -> dict[str, EntrySpec]:
    """The final tree of the layers applied in order, by OCI rules, from the model alone."""
    tree: dict[str, _Node] = {}
    inodes = iter(range(1, 1 << 62))
    for layer in layers:
        # Whiteouts and opaque markers affect the lower layers only: apply them first.
        for entry in layer.entries:
            parent, _, base = entry.path.rpartition("/")
            if entry.kind == "opaque":
                for other in [p for p in tree if p.startswith(parent + "/")]:
                    del tree[other]
            elif entry.kind == "whiteout":
                _remove_tree(tree, f"{parent}/{base[len(WHITEOUT_PREFIX):]}" if parent else base[len(WHITEOUT_PREFIX):])
        for entry in layer.entries:
            if entry.kind in ("whiteout", "opaque"):
                continue
            existing = tree.get(entry.path)
            if entry.kind == "dir" and existing is not None and existing.entry.kind == "dir":
                tree[entry.path] = _Node(entry, existing.inode)  # new metadata, same children
                continue
            if existing is not None:
                _remove_tree(tree, entry.path)
            if entry.kind == "hardlink":
                linked = tree[entry.target]
                tree[entry.path] = _Node(linked.entry, linked.inode)
            else:
                tree[entry.path] = _Node(entry, next(inodes))
    links: dict[int, int] = {}
    for node in tree.values():
        if node.entry.kind == "file":
            links[node.inode] = links.get(node.inode, 0) + 1
    digests: dict[tuple[str, int], str] = {}
    result: dict[str, EntrySpec] = {}
    for path, node in sorted(tree.items()):
        e = node.entry
        if e.kind == "dir":
            result[path] = EntrySpec("dir", e.mode)
        elif e.kind == "symlink":
            result[path] = EntrySpec("symlink", 0o777, target=e.target)
        else:
            key = (e.content_key, e.size)
            if key not in digests:
                digests[key] = content_sha256(e.content_key, e.size, e.compressible)
            result[path] = EntrySpec("file", e.mode, size=e.size, sha256=digests[key], nlink=links[node.inode])
    return result


def snapshot_tree(root: Path, exclude: Collection[str] = ("lost+found",)) -> dict[str, EntrySpec]:
    """What is really under `root` (not following symlinks), as EntrySpecs by relative
    path. Top-level names in `exclude` are skipped (an ext4 root has lost+found)."""
    root = Path(root)
    result: dict[str, EntrySpec] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in exclude]
            filenames = [f for f in filenames if f not in exclude]
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            result[rel] = _describe_path(full)
    return dict(sorted(result.items()))


def _describe_path(full: str) -> EntrySpec:
    st = os.lstat(full)
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        return EntrySpec("dir", mode, st.st_uid, st.st_gid)
    if stat.S_ISLNK(st.st_mode):
        return EntrySpec("symlink", 0o777, st.st_uid, st.st_gid, target=os.readlink(full))
    if stat.S_ISREG(st.st_mode):
        hasher = hashlib.sha256()
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as fh:
            while chunk := fh.read(1024 * 1024):
                hasher.update(chunk)
        return EntrySpec("file", mode, st.st_uid, st.st_gid, size=st.st_size,
                         sha256=hasher.hexdigest(), nlink=st.st_nlink)
    return EntrySpec("other", mode, st.st_uid, st.st_gid)


def diff_trees(expected: dict[str, EntrySpec], actual: dict[str, EntrySpec], limit: int = 20) -> list[str]:
    """Human-readable differences (missing, unexpected, changed), at most `limit` lines."""
    lines: list[str] = []
    for path in sorted(expected.keys() | actual.keys()):
        want, got = expected.get(path), actual.get(path)
        if want == got:
            continue
        if got is None:
            lines.append(f"missing: {path}")
        elif want is None:
            lines.append(f"unexpected: {path} ({got.kind})")
        else:
            changed = {k: (getattr(want, k), getattr(got, k)) for k in want.__dataclass_fields__
                       if getattr(want, k) != getattr(got, k)}
            lines.append(f"changed: {path} {changed}")
        if len(lines) >= limit:
            break
    return lines


__all__ = [
    "ALL_FAMILIES", "FAMILIES", "WHITEOUT_FAMILY", "EntrySpec", "LayerEntry", "LayerSpec",
    "build_families", "diff_trees", "expected_tree", "family_layers", "snapshot_tree",
    "upload_families", "write_layer",
]
