"""Images from an OCI registry (distribution spec v1.1): a reference resolved to the image's
manifest, config and layer blobs, and those blobs streamed into the blob store.

    options = RegistryOptions(platform="linux/amd64", plain_http=False)
    image = resolve_image("ghcr.io/org/app:1.2", options, store)   # one manifest GET when cached
    image.layers      # ObjectRefs "oci://ghcr.io/org/app@sha256:..." (size, etag = digest)
    fetch_blob(layer, store, client_for(image.options))           # images/source.py, one read

A layer is an ObjectRef like an S3 object, so it goes through images/source.py's one
download path (temp file, sha256 and images.verify.BlobCheck as the bytes arrive, Range
resume, commit under its digest only when the digest named by the manifest matches).
The blob store and the layer chains never learn where a layer came from: a registry
layer with the digest of an S3 layer is that layer.

Manifests and configs are content-addressed too: each one fetched by digest is checked
against it and kept in the blob store, so a repeat of an image whose tag still names the
same digest costs one manifest request (the tag's), even through an index.

HTTP and auth: oras-py's auth backends (bearer tokens from the `WWW-Authenticate`
challenge, anonymous or with credentials; `~/.docker/config.json` `auths`, credHelpers
and credsStore, plus `--registry-config`), on a requests session. The request loop is
ours (docs/registry.md says why): a timeout on every request, no retries underneath the
job engine's, Basic challenges answered, and bodies read with a size limit.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import platform as host_platform
import re
import threading
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from images.blobstore import CHUNK_SIZE, BlobStore, BlobWriter, check_digest
from images.formats import DEFAULT_LIMITS, GO_ARCH, INDEX_TYPES, MANIFEST_TYPES, Limits
from support.errors import PermanentError, TransientError
from support.log import get_logger

if TYPE_CHECKING:
    import requests

    from images.source import ObjectRef, ProgressCallback

log = get_logger("images.registry", component="registry")

SCHEME = "oci"
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
ACCEPT = ", ".join(sorted(MANIFEST_TYPES | INDEX_TYPES))
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
MAX_INDEX_DEPTH = 2
MANIFEST_LIMIT_ENV = "FLYIO_REGISTRY_MAX_MANIFEST_BYTES"
REFERENCE = re.compile(
    r"^(?:(?P<registry>[^/@]+[.:][^/@]*|localhost)/)?"      # a first part with a dot or port is a host
    r"(?P<repository>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


def host_platform_name() -> str:
    """This host's platform as an index names it: linux/amd64 here."""
    return f"linux/{GO_ARCH.get(host_platform.machine(), host_platform.machine())}"


@dataclass(frozen=True)
class Reference:
    """REGISTRY/REPO[:TAG|@sha256:...], parsed as docker does (no host: Docker Hub)."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        """What the manifest is asked for by: the digest when given, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}" + (f"@{self.digest}" if self.digest else f":{self.tag}")

    def blob_url(self, digest: str) -> str:
        """The layer's ObjectRef url: the blob by digest in this repository."""
        return f"{SCHEME}://{self.registry}/{self.repository}@{digest}"


def parse_reference(text: str) -> Reference:
    """`text` as a Reference; PermanentError naming what is wrong."""
    match = REFERENCE.match(text.strip())
    if not match:
        raise PermanentError(f"invalid image reference {text!r}: expected REGISTRY/REPO[:TAG|@sha256:DIGEST]")
    registry = match["registry"] or DOCKER_HUB
    repository = match["repository"]
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    tag = match["tag"] or (None if match["digest"] else "latest")
    return Reference(registry=registry, repository=repository, tag=tag, digest=match["digest"])


def parse_blob_url(url: str) -> tuple[Reference, str]:
    """An "oci://registry/repo@sha256:..." layer url as (its repository, the digest)."""
    body = url[len(f"{SCHEME}://"):]
    name, _, digest = body.rpartition("@")
    registry, _, repository = name.partition("/")
    return Reference(registry=registry, repository=repository, tag=None, digest=check_digest(digest)), digest


def is_loopback(host: str) -> bool:
    """Whether `host` (with or without :port) is this machine's loopback address."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class RegistryOptions:
    """How to reach a registry; kept in the job's context (no secret: credentials are read
    from the docker config file when a request needs them)."""

    platform: str = field(default_factory=host_platform_name)
    plain_http: bool = False
    ca_cert: str | None = None
    registry_config: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RegistryOptions:
        data = {k: v for k, v in (data or {}).items() if k in cls.__dataclass_fields__ and v is not None}
        return cls(**data)

    def check_for(self, ref: Reference) -> None:
        """--plain-http is for a registry on this machine's loopback only."""
        if self.plain_http and not is_loopback(ref.registry):
            raise PermanentError(f"--plain-http is only allowed for a registry on 127.0.0.1, not {ref.registry}; "
                                 f"use TLS (--ca-cert for a private CA)")
        parse_platform(self.platform)


def parse_platform(text: str) -> tuple[str, str, str | None]:
    """"os/arch[/variant]" -> its parts; PermanentError when malformed."""
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise PermanentError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


# -- the HTTP client ---------------------------------------------------------------------

class RegistryClient:
    """One registry's session: oras-py's auth backend answers the challenges; every request
    has a timeout and is tried once (the job engine's retry is the one retry layer)."""

    def __init__(self, registry: str, options: RegistryOptions) -> None:
        import logging

        import oras.auth
        import requests

        # oras-py logs its own "ERROR ... requires a token" beside the one-line error raised
        # here for the same failure: the operator sees ours only.
        logging.getLogger("oras").setLevel(logging.CRITICAL)
        self.registry = registry
        self.options = options
        self.scheme = "http" if options.plain_http else "https"
        self.session = requests.Session()
        self.verify: bool | str = options.ca_cert or True
        self.auth = oras.auth.get_auth_backend("token", self.session, options.plain_http, tls_verify=self.verify)
        configs = [options.registry_config] if options.registry_config else None
        self.auth._auth_config = _load_docker_configs(configs)
        self.has_credentials = False
        for host in _config_hosts(registry):
            if self.auth._load_auth(host):
                self.has_credentials = True
                break
        self._basic_first = False  # the registry asked for Basic once: send it up front from then on

    def url(self, path: str) -> str:
        host = DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry
        return f"{self.scheme}://{host}/v2/{path}"

    def get(self, path: str, *, headers: dict[str, str] | None = None, stream: bool = False) -> requests.Response:
        """GET `path` below /v2/, answering one auth challenge. Network failures are
        TransientErrors ("registry not answering"); the caller checks the status."""
        headers = dict(headers or {})
        response = self._send(path, headers, stream)
        if response.status_code == 401:
            challenge = response.headers.get("WWW-Authenticate", "")
            answered = self._answer(response, challenge, headers)
            if answered is not None:
                response.close()
                response = self._send(path, answered, stream)
        return response

    def _answer(self, response: requests.Response, challenge: str, headers: dict[str, str]) -> dict[str, str] | None:
        if challenge.lower().startswith("basic"):
            if not self.has_credentials:
                return None
            self._basic_first = True
            return {**headers, "Authorization": f"Basic {self.auth._basic_auth}"}
        if challenge.lower().startswith("bearer"):
            try:
                answered, changed = self.auth.authenticate_request(response, headers, refresh=True)
            except Exception as exc:  # requests' errors from the token endpoint
                raise _network_error(exc, self.registry) from exc
            return answered if changed else None
        return None

    def _send(self, path: str, headers: dict[str, str], stream: bool) -> requests.Response:
        import requests

        if self._basic_first and "Authorization" not in headers:
            headers = {**headers, "Authorization": f"Basic {self.auth._basic_auth}"}
        elif getattr(self.auth, "token", None) and "Authorization" not in headers:
            headers = {**headers, "Authorization": f"Bearer {self.auth.token}"}
        try:
            return self.session.get(self.url(path), headers=headers, stream=stream, verify=self.verify,
                                    timeout=(CONNECT_TIMEOUT, READ_TIMEOUT), allow_redirects=True)
        except requests.exceptions.SSLError as exc:
            raise PermanentError(f"{self.registry}: TLS verification failed ({_first_line(exc)}); "
                                 f"--ca-cert names a private CA") from None
        except requests.exceptions.RequestException as exc:
            raise _network_error(exc, self.registry) from exc

    def check(self, response: requests.Response, what: str) -> None:
        """PermanentError or TransientError for a response that is not 200/206."""
        status = response.status_code
        if status in (200, 206):
            return
        code = _error_code(response)
        response.close()
        if status == 401:
            hint = ("credentials refused" if self.has_credentials else
                    f"no credentials for {self.registry} in ~/.docker/config.json or --registry-config")
            raise PermanentError(f"{what}: unauthorized (401): {hint}")
        if status == 403:
            raise PermanentError(f"{what}: access denied (403{' ' + code if code else ''})")
        if status == 404:
            raise PermanentError(f"{what}: not found (404{' ' + code if code else ''}): unknown repository, "
                                 f"tag or digest")
        if status == 429 or status >= 500:
            raise TransientError(f"{what}: registry error {status}{' ' + code if code else ''}")
        raise PermanentError(f"{what}: registry answered {status}{' ' + code if code else ''}")


def _load_docker_configs(configs: list[str] | None) -> dict[str, Any]:
    """auths (and credHelpers, credsStore) of --registry-config, else ~/.docker/config.json.
    oras-py's loader reads both when a path is given: an explicit file alone is clearer."""
    import os

    import oras.auth.utils

    if configs:
        missing = [path for path in configs if not os.path.isfile(path)]
        if missing:
            raise PermanentError(f"--registry-config {missing[0]}: no such file")
        try:
            data = [json.loads(open(path).read()) for path in configs]
        except (OSError, ValueError) as exc:
            raise PermanentError(f"--registry-config: cannot read {configs[0]}: {exc}") from None
        return {"auths": {k: v for d in data for k, v in (d.get("auths") or {}).items()},
                "credsStore": next((d["credsStore"] for d in data if d.get("credsStore")), None),
                "credHelpers": {k: v for d in data for k, v in (d.get("credHelpers") or {}).items()}}
    try:
        return oras.auth.utils.load_configs(None)
    except (OSError, ValueError) as exc:
        raise PermanentError(f"~/.docker/config.json: cannot read it: {exc}") from None


def _config_hosts(registry: str) -> list[str]:
    """The keys a docker config may file credentials for `registry` under."""
    if registry == DOCKER_HUB:
        return ["https://index.docker.io/v1/", "index.docker.io", DOCKER_HUB, DOCKER_HUB_API]
    return [registry, f"https://{registry}", f"http://{registry}"]


def _network_error(exc: BaseException, registry: str) -> TransientError:
    return TransientError(f"{registry}: registry not answering ({type(exc).__name__}: {_first_line(exc)})")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def _error_code(response: requests.Response) -> str:
    """The distribution error code (MANIFEST_UNKNOWN, NAME_UNKNOWN, ...) when the body has one."""
    try:
        errors = json.loads(response.content[:65536]).get("errors") or []
        return str(errors[0].get("code") or "") if errors else ""
    except (ValueError, AttributeError, IndexError, TypeError):
        return ""


_clients = threading.local()


def client_for(registry: str, options: RegistryOptions) -> RegistryClient:
    """This thread's client of `registry` with `options` (a session, and its token, reused
    by every blob of a job; requests sessions are not shared between threads)."""
    cache: dict[tuple[str, RegistryOptions], RegistryClient] = _clients.__dict__.setdefault("cache", {})
    key = (registry, options)
    if key not in cache:
        cache[key] = RegistryClient(registry, options)
    return cache[key]


# -- manifests ---------------------------------------------------------------------------

@dataclass(frozen=True)
class RegistryImage:
    """What a reference resolved to: the manifest's digest (the image's identity), the
    runtime config a VM's init needs, and the layers in order."""

    ref: Reference
    manifest_digest: str   # the digest the reference named (an index's, for a multi-platform tag)
    image_digest: str      # the platform's image manifest
    config: dict[str, Any]
    layers: tuple[ObjectRef, ...]


CONFIG_KEYS = ("Env", "Entrypoint", "Cmd", "WorkingDir", "User", "ExposedPorts")


def manifest_limits(limits: Limits = DEFAULT_LIMITS) -> Limits:
    """`limits` with the manifest and config size limit of $FLYIO_REGISTRY_MAX_MANIFEST_BYTES
    (default 4 MiB, what registries accept: the distribution server refuses larger pushes)."""
    import dataclasses
    import os

    value = os.environ.get(MANIFEST_LIMIT_ENV, "")
    if not value:
        return limits
    if not value.isdigit() or int(value) < 1024:
        raise PermanentError(f"{MANIFEST_LIMIT_ENV}={value!r}: expected a number of bytes, at least 1024")
    return dataclasses.replace(limits, max_json_bytes=int(value))


def resolve_image(text: str, options: RegistryOptions, store: BlobStore,
                  limits: Limits | None = None) -> RegistryImage:
    """Resolve `text` to its image for `options.platform`: the tag's (or digest's) manifest
    is asked for once; a platform manifest or config already in the store is not asked again."""
    from images.source import ObjectRef

    limits = limits or manifest_limits()
    ref = parse_reference(text)
    options.check_for(ref)
    client = client_for(ref.registry, options)
    top_digest, document = _manifest(client, ref, ref.reference, store, limits)
    image_digest, manifest = top_digest, document
    for _ in range(MAX_INDEX_DEPTH + 1):
        if not _is_index(manifest):
            break
        image_digest = _pick_platform(manifest, options.platform, ref)
        image_digest, manifest = _manifest(client, ref, image_digest, store, limits)
    else:
        raise PermanentError(f"{ref}: image indexes nested too deep")
    if not isinstance(manifest.get("layers"), list) or not isinstance(manifest.get("config"), dict):
        raise PermanentError(f"{ref}: unsupported manifest (mediaType {manifest.get('mediaType')!r}, "
                             f"schemaVersion {manifest.get('schemaVersion')!r})")
    config = _config(client, ref, manifest["config"], store, limits)
    layers: list[ObjectRef] = []
    for descriptor in manifest["layers"]:
        digest, size = _descriptor(descriptor, ref)
        media_type = str(descriptor.get("mediaType") or "")
        if "tar" not in media_type:
            raise PermanentError(f"{ref}: layer {digest} has media type {media_type!r}, not a tar layer")
        layers.append(ObjectRef(url=ref.blob_url(digest), size=size, etag=digest))
    if not layers:
        raise PermanentError(f"{ref}: the manifest lists no layers")
    log.info("image resolved", ref=str(ref), digest=top_digest, platform=options.platform, layers=len(layers))
    return RegistryImage(ref=ref, manifest_digest=top_digest, image_digest=image_digest, config=config,
                         layers=tuple(layers))


def _is_index(document: dict[str, Any]) -> bool:
    return document.get("mediaType") in INDEX_TYPES or ("manifests" in document and "layers" not in document)


def _descriptor(descriptor: Any, ref: Reference) -> tuple[str, int]:
    if not isinstance(descriptor, dict) or not isinstance(descriptor.get("size"), int) or descriptor["size"] < 0:
        raise PermanentError(f"{ref}: malformed descriptor in the manifest")
    digest = descriptor.get("digest")
    if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise PermanentError(f"{ref}: unsupported or malformed digest {digest!r}")
    return digest, descriptor["size"]


def _pick_platform(index: dict[str, Any], wanted: str, ref: Reference) -> str:
    os_name, arch, variant = parse_platform(wanted)
    entries = index.get("manifests")
    if not isinstance(entries, list) or not entries:
        raise PermanentError(f"{ref}: the index lists no manifests")
    found: list[str] = []
    matches: list[dict[str, Any]] = []
    for entry in entries:
        plat = entry.get("platform") if isinstance(entry, dict) else None
        if not isinstance(plat, dict):
            continue  # an attestation or other artifact: not an image for a platform
        name = "/".join(p for p in (plat.get("os"), plat.get("architecture"), plat.get("variant")) if p)
        found.append(name)
        if plat.get("os") == os_name and plat.get("architecture") == arch and variant in (None, plat.get("variant")):
            matches.append(entry)
    if not matches:
        raise PermanentError(f"{ref}: no image for platform {wanted} in the index (it has "
                             f"{', '.join(found) or 'no platforms'}); --platform picks another")
    return _descriptor(matches[0], ref)[0]


def _manifest(client: RegistryClient, ref: Reference, reference: str, store: BlobStore,
              limits: Limits) -> tuple[str, dict[str, Any]]:
    """(digest, document) of the manifest `reference` (a tag or digest) names; by digest
    from the store when it was fetched before."""
    if reference.startswith("sha256:"):
        cached = _cached_json(store, reference, limits)
        if cached is not None:
            return reference, cached
    what = f"{ref.registry}/{ref.repository}:{reference}" if not reference.startswith("sha256:") else \
        f"{ref.registry}/{ref.repository}@{reference}"
    response = client.get(f"{ref.repository}/manifests/{reference}", headers={"Accept": ACCEPT}, stream=True)
    client.check(response, what)
    data = _read_limited(response, limits.max_json_bytes, f"{what}: manifest")
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if reference.startswith("sha256:") and digest != reference:
        raise PermanentError(f"checksum mismatch: {what}: manifest is {digest}")
    document = _json(data, f"{what}: manifest")
    if document.get("schemaVersion") == 1:
        raise PermanentError(f"{what}: Docker schema 1 manifests are not supported (push it again with a current tool)")
    _keep(store, digest, data)
    return digest, document


def _config(client: RegistryClient, ref: Reference, descriptor: dict[str, Any], store: BlobStore,
            limits: Limits) -> dict[str, Any]:
    """The runtime part of the image config (Env, Entrypoint, Cmd, ...), its digest checked."""
    digest, size = _descriptor(descriptor, ref)
    if size > limits.max_json_bytes:
        raise PermanentError(f"{ref}: config {digest} is {size} bytes, over the {limits.max_json_bytes} byte limit")
    document = _cached_json(store, digest, limits)
    if document is None:
        what = f"{ref.registry}/{ref.repository}@{digest}"
        response = client.get(f"{ref.repository}/blobs/{digest}", stream=True)
        client.check(response, what)
        data = _read_limited(response, limits.max_json_bytes, f"{what}: config")
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise PermanentError(f"checksum mismatch: {what}: config does not match its digest")
        document = _json(data, f"{what}: config")
        _keep(store, digest, data)
    runtime = document.get("config") or {}
    if not isinstance(runtime, dict):
        runtime = {}
    return {key: runtime[key] for key in CONFIG_KEYS if runtime.get(key) not in (None, "", [], {})}


def _read_limited(response: requests.Response, limit: int, what: str) -> bytes:
    length = response.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) > limit:
        response.close()
        raise PermanentError(f"{what} is {length} bytes, over the {limit} byte limit")
    data = bytearray()
    try:
        for chunk in response.iter_content(65536):
            data += chunk
            if len(data) > limit:
                raise PermanentError(f"{what} is over the {limit} byte limit")
    except PermanentError:
        raise
    except Exception as exc:  # the connection broke mid-body
        raise _network_error(exc, what) from exc
    finally:
        response.close()
    return bytes(data)


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PermanentError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise PermanentError(f"{what} is not a JSON object")
    return document


def _cached_json(store: BlobStore, digest: str, limits: Limits) -> dict[str, Any] | None:
    info = store.info(digest)
    if info is None or info.size > limits.max_json_bytes:
        return None
    try:
        return json.loads(info.path.read_bytes())
    except (OSError, ValueError):
        return None


def _keep(store: BlobStore, digest: str, data: bytes) -> None:
    """A manifest or config into the store under its (checked) digest."""
    if store.has(digest):
        return
    with store.writer() as writer:
        writer.write(data)
        writer.commit(digest)


# -- layer blobs ---------------------------------------------------------------------------

def stream_blob(ref: ObjectRef, digest: str, size: int, client: RegistryClient, writer: BlobWriter,
                transfer: Any, on_progress: ProgressCallback | None) -> None:
    """GET the layer blob into `writer` (from its offset, by Range, when resuming): the
    images/source.py download loop's transport for oci:// refs."""
    repo, _ = parse_blob_url(ref.url)
    headers = {"Range": f"bytes={writer.offset}-"} if writer.offset else {}
    response = client.get(f"{repo.repository}/blobs/{digest}", headers=headers, stream=True)
    client.check(response, ref.url)
    if writer.offset and response.status_code != 206:
        writer.restart()  # the registry sent the whole blob instead of the range
    try:
        for chunk in response.iter_content(CHUNK_SIZE):
            writer.write(chunk)
            transfer.received += len(chunk)
            if writer.size > size:
                raise PermanentError(f"{ref.url}: blob is longer than the {size} bytes its manifest says")
            if on_progress is not None:
                on_progress(writer.size, size)
    except (PermanentError, TransientError):
        raise
    except Exception as exc:
        import requests

        if isinstance(exc, (requests.exceptions.RequestException, OSError)):
            raise _network_error(exc, client.registry) from exc
        raise
    finally:
        response.close()
