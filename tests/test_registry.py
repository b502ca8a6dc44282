"""Images pulled from a real OCI registry (Debian's docker-registry, the CNCF distribution
server, on 127.0.0.1), pushed with `skopeo copy` from OCI layouts built here: end to end
through process-image on real loop devices, mkfs.ext4 and mounts (blockfile backend)."""

from __future__ import annotations

import io
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from demo.registry import ImageSpec, Layer, layer_from_blob, make_layer, push_layout, write_oci_layout
from tests.conftest import SampleBucket
from tests.test_process_image import REPO, fields, manager, mount_snapshot, teardown

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices, mkfs and mount")
DEVICE_SIZE = "64M"


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


BASE = make_layer(tar_of({"etc/os-release": b"ID=base\n", "usr/bin/tool": b"#!/bin/sh\n"}), "tar+gzip")
MIDDLE = make_layer(tar_of({"usr/lib/libz.so": b"z" * 5000}), "tar+zstd")
TOP = make_layer(tar_of({"app/main.py": b"print('hi')\n", "etc/os-release": b"ID=app\n"}), "tar")
CONFIG = {"Env": ["PATH=/usr/bin", "APP=1"], "Entrypoint": ["/usr/bin/tool"], "Cmd": ["serve"],
          "WorkingDir": "/app", "User": "1000:1000", "ExposedPorts": {"8080/tcp": {}}}


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "state"
    yield directory
    if pool_of(directory).get_pool_status().exists:  # a refused pull never made one
        teardown(directory)


def pool_of(state_dir: Path) -> Any:
    from devices.base import PoolConfig
    from devices.blockfile import BlockfilePool

    return BlockfilePool(PoolConfig(directory=str(state_dir)))


def push(registry: Any, tmp_path: Path, ref: str, images: list[ImageSpec], user: str | None = None) -> str:
    """Push `images` (one, or an index of several) to REGISTRY/`ref`; the full reference."""
    layout = write_oci_layout(tmp_path / f"layout-{ref.replace('/', '_').replace(':', '_')}", images)
    push_layout(layout, f"{registry.host}/{ref}", registry, user=user)
    return f"{registry.host}/{ref}"


def pull(state_dir: Path, ref: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), "process-image", "--ref", ref,
                           "--plain-http", "--backend", "blockfile", "--device-size", DEVICE_SIZE, *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def files_in(device: str, target: Path) -> dict[str, bytes]:
    mount_snapshot(device, target)
    try:
        return {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*")
                if p.is_file() and "lost+found" not in p.parts}
    finally:
        subprocess.run(["umount", str(target)], check=True, timeout=60)


def images_json(state_dir: Path) -> list[dict[str, Any]]:
    listed = manager(state_dir, "images", "--json")
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


def devices_made(state_dir: Path) -> set[str]:
    pool = pool_of(state_dir)
    if not pool.get_pool_status().exists:
        return set()
    return {device.name for device in pool.list_devices()}


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The failure, as the operator sees it: exit 1, one `error:` line, no traceback."""
    assert done.returncode == 1, (done.stdout, done.stderr[-2000:])
    assert "Traceback" not in done.stderr and "ERROR" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-2000:]
    return errors[0]


# -- references and options: pure logic ------------------------------------------------------

def test_references_parse_as_docker_does() -> None:
    from images.registry import parse_reference

    ref = parse_reference("127.0.0.1:5000/demo/app:1.2")
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == ("127.0.0.1:5000", "demo/app", "1.2", None)
    hub = parse_reference("golang")
    assert (hub.registry, hub.repository, hub.tag, hub.api_host) == ("docker.io", "library/golang", "latest",
                                                                      "registry-1.docker.io")
    pinned = parse_reference("ghcr.io/org/app@sha256:" + "a" * 64)
    assert pinned.reference == "sha256:" + "a" * 64 and pinned.tag is None
    from support.errors import PermanentError

    with pytest.raises(PermanentError, match="invalid image reference"):
        parse_reference("Registry/UPPER:tag")


def test_plain_http_is_for_loopback_only() -> None:
    from images.registry import RegistryOptions, parse_reference
    from support.errors import PermanentError

    RegistryOptions(plain_http=True).check_for(parse_reference("127.0.0.1:5000/a:1"))
    RegistryOptions(plain_http=True).check_for(parse_reference("localhost:5000/a:1"))
    with pytest.raises(PermanentError, match="only allowed for a registry on 127.0.0.1"):
        RegistryOptions(plain_http=True).check_for(parse_reference("registry.example.com/a:1"))
    with pytest.raises(PermanentError, match="invalid platform"):
        RegistryOptions(platform="amd64").check_for(parse_reference("127.0.0.1:5000/a:1"))


# -- pulls end to end --------------------------------------------------------------------------

@needs_root
def test_pull_by_ref_gzip_zstd_and_plain_layers_with_config_and_a_one_request_repeat(
        registry: Any, state_dir: Path, tmp_path: Path) -> None:
    ref = push(registry, tmp_path, "demo/app:1", [ImageSpec((BASE, MIDDLE, TOP), CONFIG)])
    done = pull(state_dir, ref)
    assert done.returncode == 0, done.stderr[-3000:]
    result = fields(done.stdout)
    assert result["state"] == "complete" and result["image"] == "demo/app:1"
    assert done.stderr.count("blob downloaded") == 3, done.stderr[-3000:]
    assert files_in(result["snapshot_device"], tmp_path / "mnt") == {
        "etc/os-release": b"ID=app\n", "usr/bin/tool": b"#!/bin/sh\n", "usr/lib/libz.so": b"z" * 5000,
        "app/main.py": b"print('hi')\n"}
    with sqlite3.connect(state_dir / "images.db") as db:
        formats = dict(db.execute("SELECT digest, format FROM layers").fetchall())
    assert formats == {BASE.digest: "tar+gzip", MIDDLE.digest: "tar+zstd", TOP.digest: "tar"}

    (image,) = images_json(state_dir)
    assert image["config"] == CONFIG
    assert image["source"] == f"oci://{ref}" and image["activation_status"] == "active"

    # The repeat: the tag's manifest, asked once, names the same digest: done, nothing else asked.
    before = len(registry.requests())
    again = pull(state_dir, ref)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "image already complete; nothing to do" in again.stderr
    assert fields(again.stdout)["job_id"] == result["job_id"]
    assert registry.requests()[before:] == ["GET /v2/demo/app/manifests/1 HTTP/1.1"]

    # The database lost: rebuild-db gives the image back with its config, and its job, so the
    # next pull is still the one-request repeat.
    for suffix in ("", "-wal", "-shm"):
        (state_dir / f"images.db{suffix}").unlink(missing_ok=True)
    rebuilt = subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), "rebuild-db", "--backend",
                              "blockfile"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rebuilt.returncode == 0 and "rebuilt: images=1 layers=3 snapshots=1" in rebuilt.stdout, rebuilt.stderr
    (image,) = images_json(state_dir)
    assert image["config"] == CONFIG and image["activation_status"] == "active"
    before = len(registry.requests())
    again = pull(state_dir, ref)
    assert again.returncode == 0 and "image already complete; nothing to do" in again.stderr, again.stderr[-3000:]
    assert registry.requests()[before:] == ["GET /v2/demo/app/manifests/1 HTTP/1.1"]


@needs_root
def test_index_of_two_platforms_picks_the_hosts_or_the_one_asked_for(registry: Any, state_dir: Path,
                                                                     tmp_path: Path) -> None:
    arm = make_layer(tar_of({"arch": b"arm64\n"}), "tar+zstd")
    amd = make_layer(tar_of({"arch": b"amd64\n"}), "tar+gzip")
    ref = push(registry, tmp_path, "demo/multi:1", [ImageSpec((BASE, amd), {"Cmd": ["amd"]}),
                                                    ImageSpec((BASE, arm), {"Cmd": ["arm"]}, architecture="arm64")])
    host = pull(state_dir, ref)
    assert host.returncode == 0, host.stderr[-3000:]
    assert files_in(fields(host.stdout)["snapshot_device"], tmp_path / "mnt")["arch"] == b"amd64\n"

    other = pull(state_dir, ref, "--platform", "linux/arm64")
    assert other.returncode == 0, other.stderr[-3000:]
    assert files_in(fields(other.stdout)["snapshot_device"], tmp_path / "mnt")["arch"] == b"arm64\n"
    configs = {image["source"]: image["config"] for image in images_json(state_dir)}
    assert configs == {f"oci://{ref}": {"Cmd": ["amd"]}, f"oci://{ref}#linux/arm64": {"Cmd": ["arm"]}}
    with sqlite3.connect(state_dir / "images.db") as db:  # the shared base layer: one device
        assert db.execute("SELECT count(*) FROM unpacked_images WHERE layer_digest = ?",
                          (BASE.digest,)).fetchone()[0] == 1

    devices = devices_made(state_dir)
    missing = pull(state_dir, ref, "--platform", "linux/s390x")
    line = one_error_line(missing)
    assert "no image for platform linux/s390x in the index (it has linux/amd64, linux/arm64)" in line
    assert devices_made(state_dir) == devices


@needs_root
def test_a_tag_moved_to_a_new_digest_is_a_new_job_for_the_same_image(registry: Any, state_dir: Path,
                                                                     tmp_path: Path) -> None:
    v1 = make_layer(tar_of({"version": b"1\n"}), "tar+gzip")
    v2 = make_layer(tar_of({"version": b"2\n"}), "tar+gzip")
    ref = push(registry, tmp_path, "demo/moving:stable", [ImageSpec((BASE, v1), {"Env": ["V=1"]})])
    first = pull(state_dir, ref)
    assert first.returncode == 0, first.stderr[-3000:]
    v1_digest = manifest_digest(registry, "demo/moving", "stable")
    push(registry, tmp_path / "v2", "demo/moving:stable", [ImageSpec((BASE, v2), {"Env": ["V=2"]})])
    second = pull(state_dir, ref)
    assert second.returncode == 0, second.stderr[-3000:]
    assert fields(second.stdout)["job_id"] != fields(first.stdout)["job_id"]
    assert "image already complete" not in second.stderr
    assert second.stderr.count("blob downloaded") == 1  # the base layer is known by its digest
    assert files_in(fields(second.stdout)["snapshot_device"], tmp_path / "mnt")["version"] == b"2\n"
    (image,) = images_json(state_dir)
    assert image["config"] == {"Env": ["V=2"]} and image["layer_count"] == 2

    # The old image by digest: an image of its own, on the devices v1 made.
    pinned = pull(state_dir, f"{registry.host}/demo/moving@{v1_digest}")
    assert pinned.returncode == 0, pinned.stderr[-3000:]
    assert pinned.stderr.count("layer already unpacked; reusing its device") == 2
    assert files_in(fields(pinned.stdout)["snapshot_device"], tmp_path / "mnt")["version"] == b"1\n"
    assert {i["name"]: i["config"] for i in images_json(state_dir)} == {
        "demo/moving:stable": {"Env": ["V=2"]}, f"demo/moving@{v1_digest}": {"Env": ["V=1"]}}


def manifest_digest(registry: Any, repository: str, tag: str) -> str:
    """The digest of the manifest the tag names now, read from the registry directly."""
    import hashlib
    import urllib.request

    accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"
    with urllib.request.urlopen(urllib.request.Request(f"http://{registry.host}/v2/{repository}/manifests/{tag}",
                                                       headers={"Accept": accept})) as response:
        return "sha256:" + hashlib.sha256(response.read()).hexdigest()


# -- errors: one line, no job, no device ---------------------------------------------------------

@needs_root
def test_unknown_repository_or_tag_is_one_line_and_nothing_made(registry: Any, state_dir: Path,
                                                                  tmp_path: Path) -> None:
    push(registry, tmp_path, "demo/known:1", [ImageSpec((BASE,))])
    for ref in (f"{registry.host}/demo/never-pushed:1", f"{registry.host}/demo/known:2"):
        line = one_error_line(pull(state_dir, ref))
        assert "not found (404" in line and "unknown repository, tag or digest" in line, line
    assert devices_made(state_dir) == set()
    assert not (state_dir / "images.db").exists() or images_json(state_dir) == []


@needs_root
def test_a_registry_that_does_not_answer_is_one_line(state_dir: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    line = one_error_line(pull(state_dir, f"127.0.0.1:{port}/demo/app:1"))
    assert f"127.0.0.1:{port}: registry not answering" in line, line
    assert devices_made(state_dir) == set()


def test_plain_http_elsewhere_is_refused_before_any_request(state_dir: Path) -> None:
    line = one_error_line(pull(state_dir, "registry.example.com/demo/app:1"))
    assert "--plain-http is only allowed for a registry on 127.0.0.1" in line


@needs_root
def test_a_manifest_over_the_size_limit_is_refused(registry: Any, state_dir: Path, tmp_path: Path) -> None:
    import urllib.request

    push(registry, tmp_path, "demo/big:1", [ImageSpec((BASE,))])
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    with urllib.request.urlopen(urllib.request.Request(f"http://{registry.host}/v2/demo/big/manifests/1",
                                                       headers=accept)) as response:
        manifest = json.loads(response.read())
    manifest["annotations"] = {"padding": "x" * 100_000}
    put = urllib.request.Request(f"http://{registry.host}/v2/demo/big/manifests/2", method="PUT",
                                 data=json.dumps(manifest).encode(),
                                 headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    urllib.request.urlopen(put).close()
    # The registry takes up to 4 MiB (it refuses larger pushes); the limit here is lowered to see ours.
    env = {**os.environ, "FLYIO_REGISTRY_MAX_MANIFEST_BYTES": "65536"}
    line = one_error_line(pull(state_dir, f"{registry.host}/demo/big:2", env=env))
    assert "manifest is over the 65536 byte limit" in line or "byte limit" in line, line
    assert devices_made(state_dir) == set()


@needs_root
def test_a_blob_whose_digest_does_not_match_aborts_with_no_device(registry: Any, state_dir: Path,
                                                                    tmp_path: Path) -> None:
    layer = make_layer(tar_of({"data": b"original bytes\n"}), "tar")
    ref = push(registry, tmp_path, "demo/corrupt:1", [ImageSpec((layer,))])
    stored = registry.blob_path(layer.digest)
    stored.write_bytes(tar_of({"data": b"tampered bytes\n"}))  # same size, other bytes
    done = pull(state_dir, ref)
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert "state=aborted" in last and f"checksum mismatch: expected {layer.digest}" in last, last
    assert devices_made(state_dir) == set()
    assert list((state_dir / "blobs" / "tmp").iterdir()) == []  # nothing half-written kept
    assert not (state_dir / "blobs" / "sha256" / layer.digest.split(":")[1]).exists()


# -- auth ------------------------------------------------------------------------------------------

def docker_config(path: Path, registry: Any, user: str, password: str) -> Path:
    import base64

    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": {registry.host: {"auth": token}}}))
    return path


@needs_root
def test_basic_auth_from_the_docker_config_or_registry_config(auth_registry: Any, state_dir: Path,
                                                               tmp_path: Path) -> None:
    ref = push(auth_registry, tmp_path, "private/app:1", [ImageSpec((BASE, TOP), {"Cmd": ["x"]})], user="ann")
    home = tmp_path / "home"
    env = {**os.environ, "HOME": str(home)}

    line = one_error_line(pull(state_dir, ref, env=env))  # no credentials anywhere
    assert "unauthorized (401)" in line and f"no credentials for {auth_registry.host}" in line, line
    wrong = docker_config(tmp_path / "wrong.json", auth_registry, "ann", "guess")
    line = one_error_line(pull(state_dir, ref, "--registry-config", str(wrong), env=env))
    assert "unauthorized (401): credentials refused" in line, line
    assert devices_made(state_dir) == set()

    good = docker_config(tmp_path / "good.json", auth_registry, "ann", "s3cret")
    done = pull(state_dir, ref, "--registry-config", str(good), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert fields(done.stdout)["state"] == "complete"

    docker_config(home / ".docker" / "config.json", auth_registry, "ann", "s3cret")
    again = pull(state_dir, ref, env=env)  # ~/.docker/config.json: the repeat answers from the database
    assert again.returncode == 0, again.stderr[-3000:]
    assert "image already complete; nothing to do" in again.stderr


# -- the same layers from S3 and from a registry ---------------------------------------------------

@needs_root
def test_the_same_layers_from_s3_and_a_registry_share_devices_and_tree(registry: Any, sample_bucket: SampleBucket,
                                                                        state_dir: Path, tmp_path: Path) -> None:
    from demo.samples import snapshot_tree

    from_s3 = manager(state_dir, "process-image", "--image", "golang", "--bucket", sample_bucket.name,
                      "--endpoint-url", sample_bucket.endpoint_url, "--backend", "blockfile",
                      "--device-size", "256M")
    assert from_s3.returncode == 0, from_s3.stderr[-3000:]
    layers: list[Layer] = [layer_from_blob(path.read_bytes()) for path in sample_bucket.layers["golang"]]
    ref = push(registry, tmp_path, "samples/golang:1", [ImageSpec(tuple(layers), {"Cmd": ["go"]})])
    with sqlite3.connect(state_dir / "images.db") as db:
        devices_before = db.execute("SELECT count(*) FROM unpacked_images").fetchone()[0]

    from_registry = pull(state_dir, ref, "--device-size", "256M")
    assert from_registry.returncode == 0, from_registry.stderr[-3000:]
    assert "blob downloaded" not in from_registry.stderr  # every digest was in the store already
    assert from_registry.stderr.count("layer already unpacked; reusing its device") == 5
    with sqlite3.connect(state_dir / "images.db") as db:
        assert db.execute("SELECT count(*) FROM unpacked_images").fetchone()[0] == devices_before
        tops = {row[0] for row in db.execute("SELECT top_chain_id FROM images")}
    assert len(tops) == 1  # both images stand on the same top layer device

    trees = []
    for name, done in (("s3", from_s3), ("registry", from_registry)):
        target = tmp_path / f"mnt-{name}"
        mount_snapshot(fields(done.stdout)["snapshot_device"], target)
        try:
            trees.append(snapshot_tree(target))
        finally:
            subprocess.run(["umount", str(target)], check=True, timeout=60)
    assert trees[0] == trees[1] and len(trees[0]) > 10


# -- through the daemon ----------------------------------------------------------------------------

@needs_root
def test_submit_ref_through_the_daemon(registry: Any, state_dir: Path, tmp_path: Path) -> None:
    from daemon.protocol import request
    from tests.test_daemon import DaemonProcess, free_port

    ref = push(registry, tmp_path, "demo/daemon:1", [ImageSpec((BASE, MIDDLE), {"Cmd": ["daemon"]})])
    daemon = DaemonProcess(state_dir, free_port(), tmp_path / "daemon.log")
    try:
        daemon.start()
        with pytest.raises(Exception, match="go with \"ref\" only"):
            request(state_dir, {"op": "process-image", "s3_key": "a.tar", "plain_http": True})
        done = manager(state_dir, "submit", "--ref", ref, "--plain-http", "--wait", "--timeout", "120")
        assert done.returncode == 0, (done.stderr[-2000:], daemon.log())
        result = fields(done.stdout)
        assert result["state"] == "complete" and result["image"] == "demo/daemon:1"
        (image,) = images_json(state_dir)
        assert image["config"] == {"Cmd": ["daemon"]} and image["layer_count"] == 2
        assert manager(state_dir, "shutdown").returncode == 0
        assert daemon.wait() == 0
    finally:
        daemon.kill()


# -- bearer tokens ---------------------------------------------------------------------------------

@needs_root
def test_bearer_token_from_the_challenge(state_dir: Path, tmp_path: Path) -> None:
    """The registry asks for a bearer token (`WWW-Authenticate: Bearer realm=...`): the pull
    gets one from the realm with the docker config's credentials, for the repository's pull
    scope, and uses it for the manifest and every blob."""
    from demo.registry import RegistryError, find_registry, start_registry
    from tests.token_server import TokenServer

    try:
        find_registry()
    except RegistryError as exc:
        pytest.skip(str(exc))
    with TokenServer(tmp_path / "issuer", users={"bea": "t0ken"}) as issuer, \
            start_registry(tmp_path / "token-registry", token_auth=issuer.registry_settings) as token_registry:
        token_registry.users["bea"] = "t0ken"  # skopeo pushes with them, through the same issuer
        ref = push(token_registry, tmp_path, "team/app:1", [ImageSpec((BASE, MIDDLE), {"User": "app"})], user="bea")
        line = one_error_line(pull(state_dir, ref, env={**os.environ, "HOME": str(tmp_path / "nobody")}))
        assert "unauthorized (401)" in line, line

        issued = len(issuer.issued)
        config = docker_config(tmp_path / "bea.json", token_registry, "bea", "t0ken")
        done = pull(state_dir, ref, "--registry-config", str(config))
        assert done.returncode == 0, done.stderr[-3000:]
        assert fields(done.stdout)["state"] == "complete"
        pulls = [claims for claims in issuer.issued[issued:]]
        assert pulls and all(c["sub"] == "bea" for c in pulls), pulls
        assert {"type": "repository", "name": "team/app", "actions": ["pull"]} in pulls[0]["access"], pulls
        (image,) = images_json(state_dir)
        assert image["config"] == {"User": "app"}


# -- TLS -------------------------------------------------------------------------------------------

def make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA, and a certificate it signs for 127.0.0.1 (subjectAltName IP): (ca, cert, key)."""
    from support.proc import run_command

    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "server.pem", directory / "server.key", directory / "server.csr"
    run_command(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
                 "-days", "1", "-subj", "/CN=flyio test CA"], timeout=60)
    run_command(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                 "-subj", "/CN=127.0.0.1"], timeout=60)
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run_command(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
                 "-out", str(cert), "-days", "1", "-extfile", str(directory / "san.cnf")], timeout=60)
    return ca, cert, key


@needs_root
def test_tls_is_verified_and_ca_cert_names_a_private_ca(state_dir: Path, tmp_path: Path) -> None:
    from demo.registry import RegistryError, find_registry, start_registry

    try:
        find_registry()
    except RegistryError as exc:
        pytest.skip(str(exc))
    ca, cert, key = make_ca_and_server_cert(tmp_path / "pki")
    with start_registry(tmp_path / "tls-registry", tls=(cert, key)) as tls_registry:
        ref = push(tls_registry, tmp_path, "secure/app:1", [ImageSpec((BASE,), {"Cmd": ["tls"]})])

        def pull_tls(*args: str) -> subprocess.CompletedProcess[str]:  # no --plain-http
            return subprocess.run([sys.executable, "-m", "cli", "--state-dir", str(state_dir), "process-image",
                                   "--ref", ref, "--backend", "blockfile", "--device-size", DEVICE_SIZE, *args],
                                  cwd=REPO, capture_output=True, text=True, timeout=300)

        line = one_error_line(pull_tls())  # the private CA is not in the system's bundle
        assert "TLS verification failed" in line and "--ca-cert" in line, line
        done = pull_tls("--ca-cert", str(ca))
        assert done.returncode == 0, done.stderr[-3000:]
        assert fields(done.stdout)["state"] == "complete"
        assert images_json(state_dir)[0]["source"] == f"oci://{ref}"


@needs_root
def test_docker_schema2_manifest_list_and_manifests(registry: Any, state_dir: Path, tmp_path: Path) -> None:
    """skopeo converts the layout to Docker's media types on the way: a manifest list of
    two platforms, schema 2 manifests, `rootfs.diff.tar.gzip` layers."""
    import urllib.request

    arm = make_layer(tar_of({"arch": b"arm64\n"}), "tar+gzip")
    amd = make_layer(tar_of({"arch": b"amd64\n"}), "tar+gzip")
    layout = write_oci_layout(tmp_path / "docker-layout", [
        ImageSpec((BASE, amd), {"Cmd": ["amd"]}), ImageSpec((BASE, arm), {"Cmd": ["arm"]}, architecture="arm64")])
    push_layout(layout, f"{registry.host}/demo/dockerish:1", registry, docker_format=True)
    accept = ", ".join(["application/vnd.docker.distribution.manifest.list.v2+json",
                        "application/vnd.oci.image.index.v1+json"])
    with urllib.request.urlopen(urllib.request.Request(f"http://{registry.host}/v2/demo/dockerish/manifests/1",
                                                       headers={"Accept": accept})) as response:
        assert response.headers["Content-Type"] == "application/vnd.docker.distribution.manifest.list.v2+json"

    done = pull(state_dir, f"{registry.host}/demo/dockerish:1", "--platform", "linux/arm64")
    assert done.returncode == 0, done.stderr[-3000:]
    assert files_in(fields(done.stdout)["snapshot_device"], tmp_path / "mnt")["arch"] == b"arm64\n"
    (image,) = images_json(state_dir)
    assert image["config"] == {"Cmd": ["arm"]}


def test_an_interrupted_layer_download_resumes_by_range(registry: Any, tmp_path: Path) -> None:
    """The temp file of a cut-off download (named after the blob's url and digest) is
    resumed with a Range request: only the rest comes over the wire, and the whole is
    checked (digest and tar structure) before it is stored."""
    from images.blobstore import BlobStore
    from images.registry import RegistryOptions, client_for, resolve_image
    from images.source import fetch_blob, partial_path
    from images.verify import BlobCheck

    big = make_layer(tar_of({f"f{i}": os.urandom(20_000) for i in range(20)}), "tar+gzip")
    ref = push(registry, tmp_path, "demo/resume:1", [ImageSpec((big,))])
    store = BlobStore(tmp_path / "state")
    options = RegistryOptions(plain_http=True)
    (layer,) = resolve_image(ref, options, store).layers
    cut = layer.size // 3
    store.ensure_dirs()
    partial_path(store, layer).write_bytes(big.blob[:cut])

    info = fetch_blob(layer, store, client_for(registry.host, options), check=lambda size: BlobCheck(size))
    assert info.digest == big.digest and info.size == len(big.blob)
    assert info.transferred == len(big.blob) - cut  # only the rest was fetched
    assert info.findings.format == "tar+gzip" and info.findings.entries == 20
    assert not partial_path(store, layer).exists()
