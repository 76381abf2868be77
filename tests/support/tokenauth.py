"""A local upstream that does Docker Hub's anonymous bearer-token dance.

:class:`TokenAuthRegistry` is a ``docker-registry`` with its own ``auth: token`` config (the same
code path Docker Hub's registry uses), plus :class:`TokenServer`, a tiny HTTP token service in a
thread. Every ``/v2/...`` request without a valid ``Authorization: Bearer <token>`` gets ``401``
with ``WWW-Authenticate: Bearer realm="http://127.0.0.1:<token port>/token",
service="registry.test",scope="repository:<name>:pull"`` (no ``scope`` on ``GET /v2/``, as on
Docker Hub). ``GET /token?service=registry.test&scope=repository:<name>:pull`` answers
``{"token": ..., "access_token": ..., "expires_in": 300, "issued_at": ...}`` for anyone.

Tokens are ES256 JWTs whose header carries the signing certificate (``x5c``); the registry trusts
that self-signed certificate through ``rootcertbundle``. The registry accepts a token until 60 s
after its ``exp`` (distribution's leeway), so a short ``expires_in`` does not make tokens die
sooner; mint a dead one with ``issue_token(..., expires_in=-120)``. Only ``pull`` is granted unless
``allow_push=True``, so by default content goes in through the unauthenticated ``backing``
registry, whose storage directory this one shares::

    with UpstreamRegistry() as plain, TokenAuthRegistry(backing=plain) as hub:
        seed_images(plain)
        ...point the node's --upstream at hub.url...
        assert hub.token_server.request_count >= 1 and hub.unauthorized_count() >= 1
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from .net import LOCALHOST
from .registry import UpstreamRegistry

__all__ = ["DEFAULT_SERVICE", "TokenAuthRegistry", "TokenRequest", "TokenServer"]

DEFAULT_SERVICE = "registry.test"
DEFAULT_ISSUER = "pyrsia-test-token-issuer"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def parse_scope(scope: str) -> dict[str, Any] | None:
    """``"repository:library/alpine:pull,push"`` -> a JWT ``access`` entry (``None`` if bad)."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if not kind or not name or not actions:
        return None
    return {"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]}


@dataclass(frozen=True)
class TokenRequest:
    """One request the token service answered."""

    method: str
    path: str
    service: str | None
    scopes: tuple[str, ...]
    status: int
    authorization: str | None  # the client's Authorization header, if it sent one
    user_agent: str | None


class TokenServer:
    """An anonymous bearer-token service on ``127.0.0.1:<free port>``, run in a thread.

    The port is bound in ``__init__`` (so ``realm`` is known before the registry starts);
    ``start()`` serves, ``stop()`` shuts down and joins the thread.
    """

    def __init__(
        self,
        *,
        service: str = DEFAULT_SERVICE,
        issuer: str = DEFAULT_ISSUER,
        expires_in: int = 300,
        allow_push: bool = False,
    ) -> None:
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in
        self.allow_push = allow_push
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._httpd = ThreadingHTTPServer((LOCALHOST, 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- tokens ----------------------------------------------------------------------------

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue_token(self, scopes: Sequence[str] = (), *, expires_in: int | None = None) -> str:
        """A signed JWT granting ``pull`` (and ``push``/``delete`` if ``allow_push``)."""
        allowed = {"pull"} | ({"push", "delete", "*"} if self.allow_push else set())
        access: list[dict[str, Any]] = []
        for scope in scopes:
            entry = parse_scope(scope)
            if entry is None:
                continue
            entry["actions"] = [a for a in entry["actions"] if a in allowed]
            access.append(entry)
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": "",
            "aud": self.service,
            "exp": now + (self.expires_in if expires_in is None else expires_in),
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(der).decode()]}
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        r, s = decode_dss_signature(
            self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        )
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    # -- bookkeeping -----------------------------------------------------------------------

    @property
    def requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        """How many token requests were answered with a token (status 200)."""
        with self._lock:
            return sum(1 for r in self._requests if r.status == 200)

    def _record(self, req: TokenRequest) -> None:
        with self._lock:
            self._requests.append(req)

    # -- HTTP ------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        port: int = self._httpd.server_address[1]
        return port

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # silence stderr
                return

            def _answer(self, status: int, body: Mapping[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _handle(self, params: dict[str, list[str]]) -> None:
                path = urlsplit(self.path).path
                services = params.get("service") or []
                service = services[0] if services else None
                scopes = tuple(s for raw in params.get("scope", []) for s in raw.split(" ") if s)
                body: dict[str, Any]
                if path != "/token":
                    status, body = 404, {"details": "not found"}
                elif service != server.service:
                    status, body = 400, {"details": f"unknown service {service!r}"}
                else:
                    token = server.issue_token(scopes)
                    status = 200
                    body = {
                        "token": token,
                        "access_token": token,
                        "expires_in": server.expires_in,
                        "issued_at": dt.datetime.now(dt.timezone.utc).strftime(
                            "%Y-%m-%dT%H:%M:%S.%fZ"
                        ),
                    }
                server._record(
                    TokenRequest(
                        method=self.command,
                        path=path,
                        service=service,
                        scopes=scopes,
                        status=status,
                        authorization=self.headers.get("Authorization"),
                        user_agent=self.headers.get("User-Agent"),
                    )
                )
                self._answer(status, body)

            def do_GET(self) -> None:
                self._handle(parse_qs(urlsplit(self.path).query))

            def do_POST(self) -> None:  # OAuth2 form flow (docker with refresh tokens)
                length = int(self.headers.get("Content-Length") or 0)
                form = self.rfile.read(length).decode(errors="replace")
                self._handle(parse_qs(form))

        return Handler

    def start(self) -> TokenServer:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"token-server-{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._httpd.shutdown()
            thread.join(10)
        self._httpd.server_close()

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class TokenAuthRegistry(UpstreamRegistry):
    """A ``docker-registry`` behind anonymous bearer-token auth, with its :class:`TokenServer`.

    ``backing``: serve the content of that (unauthenticated) registry by sharing its storage
    directory; otherwise it has its own storage (then pass ``allow_push=True`` to seed it, e.g.
    with skopeo, which does the token flow itself). ``url`` / ``host`` / access-log methods are
    those of :class:`UpstreamRegistry`; :meth:`unauthorized_count` counts the 401s it served.
    """

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        backing: UpstreamRegistry | None = None,
        storage_dir: Path | str | None = None,
        service: str = DEFAULT_SERVICE,
        expires_in: int = 300,
        allow_push: bool = False,
        port: int | None = None,
    ) -> None:
        if backing is not None and storage_dir is not None:
            raise ValueError("give backing or storage_dir, not both")
        self.backing = backing
        self.token_server = TokenServer(
            service=service, expires_in=expires_in, allow_push=allow_push
        )
        super().__init__(
            workdir,
            storage_dir=backing.storage_dir if backing is not None else storage_dir,
            port=port,
        )
        self.cert_path = self.workdir / "token-root.pem"
        self.cert_path.write_bytes(self.token_server.certificate_pem())
        self._extra_config = {
            "auth": {
                "token": {
                    "realm": self.token_server.realm,
                    "service": service,
                    "issuer": self.token_server.issuer,
                    "rootcertbundle": str(self.cert_path),
                }
            }
        }

    @property
    def service(self) -> str:
        return self.token_server.service

    @property
    def realm(self) -> str:
        return self.token_server.realm

    def start(self) -> TokenAuthRegistry:
        self.token_server.start()
        super().start()
        return self

    def close(self) -> None:
        super().close()
        self.token_server.stop()

    def __enter__(self) -> TokenAuthRegistry:
        return self.start()

    def issue_token(self, *scopes: str, expires_in: int | None = None) -> str:
        """A token for ``scopes`` without going through HTTP (not counted).

        distribution 2.8 accepts a token until 60 s (its leeway) after ``exp``; for an
        already-rejected token use ``expires_in=-120``.
        """
        return self.token_server.issue_token(scopes, expires_in=expires_in)

    def challenge(self, repo: str | None = None, actions: str = "pull") -> str:
        """The ``WWW-Authenticate`` value this registry sends for ``repo`` (None: ``/v2/``)."""
        value = f'Bearer realm="{self.realm}",service="{self.service}"'
        if repo is not None:
            value += f',scope="repository:{repo}:{actions}"'
        return value

    def unauthorized_since(self, mark: int = 0) -> list[tuple[str, str, int]]:
        """Requests answered ``401`` after ``mark``."""
        return [r for r in self.requests(mark) if r[2] == 401]

    def unauthorized_count(self, since: int = 0) -> int:
        return len(self.unauthorized_since(since))
