"""demo.samples: deterministic, production-shaped, and its answer key agrees with GNU tar."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest

from demo.samples import (
    FAMILIES,
    OPAQUE_MARKER,
    WHITEOUT_FAMILY,
    WHITEOUT_PREFIX,
    build_families,
    diff_trees,
    expected_tree,
    family_layers,
    snapshot_tree,
)
from images.formats import sniff_format
from images.source import family_prefix, list_family
from images.verify import verify_blob
from support.proc import run_command

SCALE_MB = 2.0


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    return build_families(tmp_path_factory.mktemp("samples"), SCALE_MB)


def test_same_seed_same_bytes(built: dict[str, list[Path]], tmp_path: Path) -> None:
    again = build_families(tmp_path, SCALE_MB)
    assert again.keys() == built.keys()
    for family, paths in built.items():
        assert [sha256_file(p) for p in again[family]] == [sha256_file(p) for p in paths]
    other_seed = build_families(tmp_path / "other", SCALE_MB, seed="another", families=["node"])
    assert sha256_file(other_seed["node"][0]) != sha256_file(built["node"][0])


def test_layout_and_shared_layers(built: dict[str, list[Path]]) -> None:
    for family in FAMILIES:
        assert [p.name for p in built[family]] == ["1.tar", "2.tar", "3.tar", "4.tar", "5.tar"]
        assert built[family][0].parent.as_posix().endswith(f"images/{family}")
    for n in range(3):
        assert len({sha256_file(built[f][n]) for f in FAMILIES}) == 1, f"layer {n + 1} differs"
    assert len({sha256_file(built[f][3]) for f in FAMILIES}) == 3
    assert sha256_file(built[WHITEOUT_FAMILY][0]) == sha256_file(built["node"][0])
    total = sum(p.stat().st_size for p in built["golang"])
    assert 0.5 * SCALE_MB * 2**20 < total < 3 * SCALE_MB * 2**20
    assert built["node"][4].stat().st_size < 64 * 1024  # like production's 21 KB node/5.tar


def test_layers_look_like_production(built: dict[str, list[Path]]) -> None:
    for path in built["node"]:
        assert sniff_format(path) == "tar"
        assert path.read_bytes()[257:265] == b"ustar\x0000"  # POSIX ustar
        verify_blob(path, "sha256:" + sha256_file(path))
        with tarfile.open(path) as archive:
            members = archive.getmembers()
        assert members, path
        assert all(not m.name.startswith(("./", "/")) for m in members)
        assert all(m.uid == 0 and m.gid == 0 for m in members)
    with tarfile.open(built["node"][0]) as archive:
        by_name = {m.name: m for m in archive.getmembers()}
    assert by_name["etc/alternatives/editor"].linkname == "/usr/bin/vim.basic"
    assert by_name["usr/bin/X11"].issym() and by_name["usr/bin/X11"].linkname == "."
    assert by_name["usr/bin/passwd"].mode == 0o4755
    assert by_name["usr/bin/gunzip"].islnk() and by_name["usr/bin/gunzip"].linkname == "usr/bin/gzip"
    sizes: list[int] = []
    for path in built["node"]:
        with tarfile.open(path) as archive:
            sizes.extend(m.size for m in archive.getmembers() if m.isfile())
    sizes.sort()
    assert sizes[len(sizes) // 2] < 8192 and sizes[-1] > 256 * 1024  # many small, a few large


def test_content_is_partly_compressible(built: dict[str, list[Path]]) -> None:
    import gzip

    data = built["golang"][3].read_bytes()
    ratio = len(gzip.compress(data, compresslevel=1)) / len(data)
    assert 0.2 < ratio < 0.9


def test_expected_tree_models_links_and_special_modes() -> None:
    tree = expected_tree(family_layers("node", SCALE_MB))
    assert tree["usr/bin/X11"].target == "."
    assert tree["usr/bin/passwd"].mode == 0o4755
    assert tree["usr/bin/gzip"].nlink == 3 and tree["usr/bin/gunzip"].sha256 == tree["usr/bin/gzip"].sha256
    assert tree["tmp"].kind == "dir" and tree["tmp"].mode == 0o1777
    assert tree["usr/local/bin/npm"].target == "../lib/node_modules/npm/bin/npm-cli.js"
    # layer 2 rewrote etc/passwd
    assert tree["etc/passwd"].size == 1300


def _extract(layer: Path, root: Path) -> None:
    run_command(["tar", "-xpf", str(layer), "-C", str(root)], timeout=120)


@pytest.mark.parametrize("family", FAMILIES)
def test_expected_tree_matches_gnu_tar_extraction(built: dict[str, list[Path]], tmp_path: Path, family: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for layer in built[family]:
        _extract(layer, root)

    expected = expected_tree(family_layers(family, SCALE_MB))
    actual = snapshot_tree(root)

    assert diff_trees(expected, actual) == []
    assert actual == expected


def _apply_layer_with_whiteouts(layer: Path, root: Path) -> None:
    """OCI rules by hand: whiteouts and opaque markers remove lower content, then extract,
    then drop the marker files."""
    with tarfile.open(layer) as archive:
        names = [m.name.rstrip("/") for m in archive.getmembers()]
    markers: list[Path] = []
    for name in names:
        parent, _, base = name.rpartition("/")
        directory = root / parent
        if base == OPAQUE_MARKER:
            for child in directory.iterdir() if directory.is_dir() else []:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            markers.append(root / name)
        elif base.startswith(WHITEOUT_PREFIX):
            victim = directory / base[len(WHITEOUT_PREFIX):]
            if victim.is_dir() and not victim.is_symlink():
                shutil.rmtree(victim)
            elif victim.exists() or victim.is_symlink():
                victim.unlink()
            markers.append(root / name)
    _extract(layer, root)
    for marker in markers:
        marker.unlink()


def test_whiteout_family_matches_hand_applied_layers(built: dict[str, list[Path]], tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for layer in built[WHITEOUT_FAMILY]:
        _apply_layer_with_whiteouts(layer, root)

    expected = expected_tree(family_layers(WHITEOUT_FAMILY, SCALE_MB))

    assert diff_trees(expected, snapshot_tree(root)) == []
    assert "etc/motd/welcome" in expected and expected["etc/motd"].kind == "dir"
    assert expected["usr/bin/gzip"].nlink == 2 and "usr/bin/gunzip" not in expected
    assert [p for p in expected if p.startswith("usr/share/doc/")] == ["usr/share/doc/README"]
    assert "var/cache/apt" not in expected and "var/cache/new" in expected


def test_snapshot_tree_does_not_follow_symlinks(tmp_path: Path) -> None:
    (tmp_path / "lost+found").mkdir()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"abc")
    os.symlink("/", tmp_path / "d" / "root")
    os.symlink(".", tmp_path / "d" / "self")
    os.link(tmp_path / "d" / "f", tmp_path / "d" / "g")
    tree = snapshot_tree(tmp_path)
    assert set(tree) == {"d", "d/f", "d/g", "d/root", "d/self"}
    assert tree["d/root"].target == "/" and tree["d/root"].kind == "symlink"
    assert tree["d/f"].nlink == 2 and tree["d/f"].sha256 == hashlib.sha256(b"abc").hexdigest()


def test_sample_bucket_lists_like_production(sample_bucket: Any, s3_client: Any) -> None:
    for family in FAMILIES:
        refs = list_family(sample_bucket.name, family_prefix(family), s3_client)
        assert [r.key for r in refs] == [f"images/{family}/{n}.tar" for n in range(1, 6)]
        assert [r.size for r in refs] == [p.stat().st_size for p in sample_bucket.layers[family]]
