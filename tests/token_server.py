"""A bearer token issuer for the distribution registry's token auth, as Docker Hub or GHCR
run one: `GET /token?service=...&scope=repository:NAME:pull,push` with Basic credentials
answers a JWT (RS256, signed with openssl, the signing certificate in the `x5c` header) that
grants the scope's actions to a known user; without valid credentials it answers 401.

    with TokenServer(tmp / "token", users={"bea": "pw"}) as issuer:
        start_registry(..., token_auth=issuer.registry_settings)
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlparse

from support.proc import run_command

SERVICE = "flyio-test-registry"
ISSUER = "flyio-test-issuer"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """The issuer on a free port of 127.0.0.1, in a thread of the test process."""

    def __init__(self, directory: Path, users: dict[str, str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.users = dict(users)
        self.issued: list[dict[str, Any]] = []  # the claims of every token handed out
        self.key, self.cert = self.directory / "key.pem", self.directory / "cert.pem"
        run_command(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key),
                     "-out", str(self.cert), "-days", "1", "-subj", "/CN=flyio-test-issuer"], timeout=60)
        der = self.directory / "cert.der"
        run_command(["openssl", "x509", "-in", str(self.cert), "-outform", "der", "-out", str(der)], timeout=60)
        self.x5c = base64.b64encode(der.read_bytes()).decode()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.answer(self)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/token"

    @property
    def registry_settings(self) -> dict[str, str]:
        return {"realm": self.realm, "service": SERVICE, "issuer": ISSUER, "rootcertbundle": str(self.cert)}

    def answer(self, request: BaseHTTPRequestHandler) -> None:
        query = parse_qs(urlparse(request.path).query)
        user = self._user(request.headers.get("Authorization", ""))
        if user is None:
            request.send_response(401)
            request.end_headers()
            return
        access = []
        for scope in query.get("scope", []):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]})
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": user, "aud": query.get("service", [SERVICE])[0], "exp": now + 300,
                  "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex, "access": access}
        body = json.dumps({"token": self._sign(claims), "expires_in": 300}).encode()
        with self._lock:
            self.issued.append(claims)
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def _user(self, header: str) -> str | None:
        if not header.startswith("Basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return None
        return user if self.users.get(user) == password else None

    def _sign(self, claims: dict[str, Any]) -> str:
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        with self._lock:
            name = uuid.uuid4().hex
        data, signature = self.directory / f"{name}.in", self.directory / f"{name}.sig"
        data.write_text(signing_input)
        run_command(["openssl", "dgst", "-sha256", "-sign", str(self.key), "-out", str(signature), str(data)],
                    timeout=60)
        return f"{signing_input}.{b64url(signature.read_bytes())}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> TokenServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
