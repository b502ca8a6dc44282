"""The daemon's socket protocol: one JSON object per line each way, on the unix socket
`<state-dir>/fsm/manager.sock` (mode 0600: only root talks to the manager).

Requests: {"op": "process-image", "s3_key"|"image"|"s3_prefix"|"url"|"ref": ..., "bucket", "endpoint_url",
"device_size"} (with "ref": also "platform", "plain_http", "ca_cert", "registry_config"),
{"op": "snapshot", "image": NAME_OR_ID, "vm": VM_ID, "size"},
{"op": "delete-snapshot", "snapshot_id": N | "vm": VM_ID} (answered once deleted, with "deleted": the
device names), {"op": "status"},
{"op": "job", "id": N} (a request) or {"op": "job", "job_id": N}, {"op": "shutdown"}. Every reply
has "ok"; a failed one has "error" (one line). A process-image or snapshot request with
"wait": true is answered once its job is final (or left unfinished), on the same connection:
the reply carries the job's state and, for a snapshot, "snapshot" and "snapshot_device" (the
ready device's path). A snapshot request is answered with its "job_id" (it has no request id)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from support.errors import ManagerError

SOCKET_NAME = "manager.sock"
MAX_LINE_BYTES = 64 * 1024
SOURCE_FIELDS = ("s3_key", "image", "s3_prefix", "url", "ref")
REGISTRY_FIELDS = ("platform", "plain_http", "ca_cert", "registry_config")  # how a "ref" is reached
OPS = ("process-image", "snapshot", "delete-snapshot", "status", "job", "shutdown")
JOB_OPS = ("process-image", "snapshot")  # ops that queue a job


class DaemonNotRunning(ManagerError):
    """Nothing answers on the socket."""


class DaemonError(ManagerError):
    """The daemon answered with an error."""


def socket_path(state_dir: Path) -> Path:
    return state_dir / "fsm" / SOCKET_NAME


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, sort_keys=True).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """One request line -> dict, or ValueError with a one-line reason."""
    if len(line) > MAX_LINE_BYTES:
        raise ValueError(f"request longer than {MAX_LINE_BYTES} bytes")
    try:
        message = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg}") from None
    if not isinstance(message, dict):
        raise ValueError("a request is a JSON object")
    if message.get("op") not in OPS:
        raise ValueError(f"unknown op {message.get('op')!r}; one of {', '.join(OPS)}")
    return message


def request_if_serving(state_dir: Path, message: dict[str, Any], *, timeout: float) -> dict[str, Any] | None:
    """The reply of the daemon serving `state_dir`, or None when none is (the caller then
    does the work itself). The daemon holds the manager lock: with one running, a command
    that needs the lock hands its request over instead of being refused."""
    try:
        return request(state_dir, message, timeout=timeout)
    except DaemonNotRunning:
        return None


def request(state_dir: Path, message: dict[str, Any], *, timeout: float = 30.0) -> dict[str, Any]:
    """Send one request to the daemon of `state_dir` and return its reply.

    DaemonNotRunning when no daemon listens; DaemonError when it answers with an error."""
    path = socket_path(state_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunning(f"no daemon is running for {state_dir} (nothing answers on {path}: {exc.strerror})") from None
        sock.sendall(encode(message))
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    except socket.timeout:
        raise DaemonError(f"the daemon on {path} did not answer within {timeout:g}s") from None
    except OSError as exc:  # reset or broken pipe: the daemon went away mid-request
        raise DaemonError(f"the daemon on {path} closed the connection: {exc.strerror or exc}") from None
    finally:
        sock.close()
    if not reply:
        raise DaemonError(f"the daemon on {path} closed the connection without answering")
    answer = json.loads(reply)
    if not answer.get("ok"):
        raise DaemonError(str(answer.get("error") or "the daemon refused the request"))
    return answer
