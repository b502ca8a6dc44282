"""A real OCI registry on 127.0.0.1 (Debian's `docker-registry`, the CNCF distribution
server), OCI image layouts built from layer blobs, and `skopeo copy` to push them.

    with start_registry(tmp / "registry") as registry:                    # anonymous
    with start_registry(tmp / "auth", users={"ann": "secret"}) as registry:  # htpasswd (Basic)
    layout = write_oci_layout(tmp / "layout", [ImageSpec(layers=[blob1, blob2], config=...)])
    push_layout(layout, f"{registry.host}/demo/app:1", registry)       # skopeo copy

The registry stores under its own data directory, binds 127.0.0.1 on a free port, speaks
plain HTTP (clients need --plain-http, which the product allows for 127.0.0.1 only).
Layouts are written by hand, not by a tool: the tests decide every byte (gzip or zstd
layers, an index of two platforms), and `skopeo copy` pushes them as they are.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from support.errors import ManagerError
from support.log import get_logger
from support.proc import run_command

log = get_logger("demo.registry", component="registry")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TYPES = {"tar": "application/vnd.oci.image.layer.v1.tar",
               "tar+gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
               "tar+zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


class RegistryError(ManagerError):
    """The local registry could not be found, started, or did not answer in time."""


def find_registry() -> Path:
    """The distribution server (Debian package docker-registry)."""
    found = shutil.which("docker-registry") or shutil.which("registry")
    if not found:
        raise RegistryError("docker-registry not found: apt-get install docker-registry")
    return Path(found)


def find_skopeo() -> Path:
    found = shutil.which("skopeo")
    if not found:
        raise RegistryError("skopeo not found: apt-get install skopeo")
    return Path(found)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Registry:
    """A running registry; `host` is what references start with ("127.0.0.1:PORT")."""

    host: str
    process: subprocess.Popen[bytes]
    data_dir: Path
    users: dict[str, str] = field(default_factory=dict)

    @property
    def storage(self) -> Path:
        """Where the filesystem driver keeps blobs (tests corrupt one here)."""
        return self.data_dir / "storage"

    def blob_path(self, digest: str) -> Path:
        hex_digest = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest / "data"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "registry.log"

    def requests(self) -> list[str]:
        """The request lines of the access log so far ("GET /v2/demo/app/manifests/1 HTTP/1.1")."""
        import re

        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return re.findall(r'"((?:GET|HEAD|PUT|POST|PATCH|DELETE) /v2/[^"]*)"', text)

    def stop(self, timeout: float = 15.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout)
        log.info("registry stopped", host=self.host)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _htpasswd(path: Path, users: dict[str, str]) -> None:
    """bcrypt entries, as the registry's htpasswd auth reads them (apache2-utils' htpasswd)."""
    path.write_text("")
    for user, password in users.items():
        result = run_command(["htpasswd", "-Bbn", user, password], timeout=30)
        with open(path, "a") as fh:
            fh.write(result.stdout.strip() + "\n")


def start_registry(data_dir: Path, users: dict[str, str] | None = None, timeout: float = 30,
                   token_auth: dict[str, str] | None = None, tls: tuple[Path, Path] | None = None) -> Registry:
    """Start the registry on a free port of 127.0.0.1 storing under `data_dir`; with `users`
    it asks for Basic auth (htpasswd); with `token_auth` (the distribution server's
    auth.token settings: realm, service, issuer, rootcertbundle) for bearer tokens.
    With `tls` (certificate, key) it speaks HTTPS. Returns once /v2/ answers."""
    binary = find_registry()
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": False}},  # tests count requests in it
        "storage": {"filesystem": {"rootdirectory": str(data_dir / "storage")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "debug": {"addr": ""}},
    }
    if users:
        _htpasswd(data_dir / "htpasswd", users)
        config["auth"] = {"htpasswd": {"realm": "flyio-test", "path": str(data_dir / "htpasswd")}}
    elif token_auth:
        config["auth"] = {"token": dict(token_auth)}
    if tls:
        config["http"]["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
    (data_dir / "config.yml").write_text(json.dumps(config))  # JSON is YAML
    log_file = open(data_dir / "registry.log", "ab")  # noqa: SIM115 - owned by the child
    # A long-lived server cannot go through support.proc.run_command (which waits for exit).
    process = subprocess.Popen([str(binary), "serve", str(data_dir / "config.yml")], stdin=subprocess.DEVNULL,
                               stdout=log_file, stderr=subprocess.STDOUT, cwd=data_dir, start_new_session=True)
    log_file.close()
    registry = Registry(host=f"127.0.0.1:{port}", process=process, data_dir=data_dir, users=dict(users or {}))
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RegistryError(f"docker-registry exited with {process.returncode}: "
                                f"{(data_dir / 'registry.log').read_text(errors='replace')[-500:]}")
        try:
            import ssl

            urllib.request.urlopen(f"{'https' if tls else 'http'}://{registry.host}/v2/", timeout=1,
                                   context=ssl._create_unverified_context() if tls else None).close()
            break
        except urllib.error.HTTPError:
            break  # 401: up, and asking for credentials
        except OSError:
            if time.monotonic() > deadline:
                registry.stop()
                raise RegistryError(f"docker-registry did not answer on {registry.host} in {timeout:g}s") from None
            time.sleep(0.05)
    log.info("registry ready", host=registry.host, auth=bool(users), pid=process.pid)
    return registry


# -- OCI layouts ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Layer:
    """One layer blob as pushed: its bytes, their format ("tar", "tar+gzip", "tar+zstd") and
    the digest of its uncompressed tar (the config's diff_id)."""

    blob: bytes
    format: str
    diff_id: str

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.blob).hexdigest()


def make_layer(tar_bytes: bytes, fmt: str = "tar+gzip") -> Layer:
    """A layer of `tar_bytes`, compressed as `fmt` (gzip with mtime 0: the same bytes each time)."""
    import gzip

    import zstandard

    if fmt == "tar":
        blob = tar_bytes
    elif fmt == "tar+gzip":
        blob = gzip.compress(tar_bytes, mtime=0)
    elif fmt == "tar+zstd":
        blob = zstandard.ZstdCompressor().compress(tar_bytes)
    else:
        raise ValueError(fmt)
    return Layer(blob=blob, format=fmt, diff_id="sha256:" + hashlib.sha256(tar_bytes).hexdigest())


def layer_from_blob(blob: bytes) -> Layer:
    """A Layer of an existing blob (e.g. a sample family's S3 object), its format by content."""
    import gzip

    import zstandard

    if blob[:2] == b"\x1f\x8b":
        return Layer(blob, "tar+gzip", "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest())
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        tar = zstandard.ZstdDecompressor().decompressobj().decompress(blob)
        return Layer(blob, "tar+zstd", "sha256:" + hashlib.sha256(tar).hexdigest())
    return Layer(blob, "tar", "sha256:" + hashlib.sha256(blob).hexdigest())


@dataclass(frozen=True)
class ImageSpec:
    """One image of a layout: its layers, runtime config, and platform."""

    layers: tuple[Layer, ...]
    config: dict[str, Any] = field(default_factory=dict)
    os: str = "linux"
    architecture: str = "amd64"


def _put(layout: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def _image_manifest(layout: Path, image: ImageSpec) -> dict[str, Any]:
    config = {"architecture": image.architecture, "os": image.os, "config": image.config,
              "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in image.layers]}}
    config_digest, config_size = _put(layout, json.dumps(config, sort_keys=True).encode())
    layers = []
    for layer in image.layers:
        digest, size = _put(layout, layer.blob)
        layers.append({"mediaType": LAYER_TYPES[layer.format], "digest": digest, "size": size})
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size}, "layers": layers}
    digest, size = _put(layout, json.dumps(manifest, sort_keys=True).encode())
    return {"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
            "platform": {"os": image.os, "architecture": image.architecture}}


def write_oci_layout(layout: Path, images: list[ImageSpec]) -> Path:
    """An OCI image layout at `layout` tagged "latest": one image, or an index of several
    (one per platform)."""
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    descriptors = [_image_manifest(layout, image) for image in images]
    if len(descriptors) == 1:
        top = {k: v for k, v in descriptors[0].items() if k != "platform"}
    else:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
        digest, size = _put(layout, json.dumps(index, sort_keys=True).encode())
        top = {"mediaType": OCI_INDEX, "digest": digest, "size": size}
    top["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    return layout


def push_layout(layout: Path, ref: str, registry: Registry, *, user: str | None = None,
                docker_format: bool = False) -> None:
    """`skopeo copy --all` of the layout's "latest" to `ref` over plain HTTP, as it is
    (no recompression, the index kept); with `docker_format` converted to Docker schema 2
    manifests and a manifest list (gzip layers only)."""
    argv = [str(find_skopeo()), "copy", "--all", "--dest-tls-verify=false"]
    argv += ["--format", "v2s2"] if docker_format else ["--preserve-digests"]
    if user:
        argv.append(f"--dest-creds={user}:{registry.users[user]}")
    argv += [f"oci:{layout}:latest", f"docker://{ref}"]
    run_command(argv, timeout=300)
