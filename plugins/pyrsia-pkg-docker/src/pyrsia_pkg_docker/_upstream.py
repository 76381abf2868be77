"""An OCI/Docker registry as the upstream a build node fetches from.

Speaks the pull side of the OCI Distribution API with httpx, including Docker
Hub's anonymous bearer-token flow: a ``401`` with ``WWW-Authenticate: Bearer
realm=…,service=…,scope=…`` is answered by fetching a token from ``realm`` and
retrying; tokens are cached per scope until they expire.
"""

from __future__ import annotations

import logging
import re
import time
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, ClassVar

import httpx
from pyrsia_core.errors import DigestError, PyrsiaError, UsageError
from pyrsia_core.interfaces import Upstream, UpstreamResponse
from pyrsia_transport_http import PlainHttpTransport

from pyrsia_core import Digest

__all__ = ["DEFAULT_UPSTREAM", "RegistryUpstream", "UpstreamError", "UpstreamNotFound"]

log = logging.getLogger("pyrsia.upstream")
DEFAULT_UPSTREAM = "https://registry-1.docker.io"
_LOCATOR = re.compile(
    r"(?P<repo>[a-z0-9._/-]+)/(?P<kind>manifests|blobs|referrers)/(?P<ref>[A-Za-z0-9_.:-]+)"
)
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
CHUNK = 1024 * 1024
#: A transfer fails when it averages fewer bytes per second than this ...
DEFAULT_MIN_RATE = 4096.0
#: ... over the last this many seconds (a sliding window) ...
DEFAULT_RATE_WINDOW = 20.0
#: ... or when no byte at all arrives for this many seconds.
DEFAULT_IDLE_TIMEOUT = 30.0


class UpstreamError(PyrsiaError):
    """The upstream registry failed or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class UpstreamNotFound(UpstreamError, LookupError):
    """The upstream has no such manifest or blob."""


def parse_bearer_challenge(header: str) -> dict[str, str] | None:
    scheme, _, params = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return dict(_CHALLENGE_PARAM.findall(params))


class _ResponseBody:
    """The body of an upstream response as an async iterator that always closes it.

    (An async generator closed before its first ``__anext__`` never runs its
    ``finally``, which would leak the pooled connection.)
    """

    def __init__(self, resp: httpx.Response, what: str, *, min_rate: float = 0.0,
                 window: float = DEFAULT_RATE_WINDOW) -> None:
        self._resp = resp
        self._what = what
        self._chunks: AsyncIterator[bytes] | None = None
        self._min_rate = min_rate
        self._window = window
        self._start = time.monotonic()
        self._total = 0
        #: (time, bytes received so far) samples of the last ``window`` seconds.
        self._samples: deque[tuple[float, int]] = deque([(self._start, 0)])

    def __aiter__(self) -> _ResponseBody:
        return self

    async def __anext__(self) -> bytes:
        if self._chunks is None:
            # As the bytes arrive (no chunk size: httpx would hold a slow drip back until
            # a whole chunk is there, and the rate check below would never see it).
            self._chunks = self._resp.aiter_raw()
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            await self.aclose()
            raise
        except httpx.TimeoutException:
            await self.aclose()
            raise UpstreamError(f"upstream transfer of {self._what} stalled: no byte within "
                                "the idle timeout") from None
        except httpx.HTTPError as exc:
            await self.aclose()
            raise UpstreamError(f"upstream transfer of {self._what} failed: {_why(exc)}") from None
        self._total += len(chunk)
        if self._min_rate > 0:
            await self._check_rate()
        return chunk

    async def _check_rate(self) -> None:
        """Fail a transfer that averaged under ``min_rate`` over the last ``window`` s."""
        now = time.monotonic()
        samples = self._samples
        samples.append((now, self._total))
        while len(samples) > 1 and samples[1][0] <= now - self._window:
            samples.popleft()
        if now - self._start < self._window:
            return
        # samples[0] is the last sample at or before the window's start.
        received = self._total - samples[0][1]
        if received < self._min_rate * self._window:
            await self.aclose()
            raise UpstreamError(
                f"upstream transfer of {self._what} too slow: {received} bytes in the last "
                f"{self._window:g} s (at least {self._min_rate:g} bytes/s needed)")

    async def aclose(self) -> None:
        await self._resp.aclose()


class RegistryUpstream(Upstream):
    name: ClassVar[str] = "registry"

    def __init__(
        self,
        url: str = DEFAULT_UPSTREAM,
        *,
        timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
        min_rate: float = DEFAULT_MIN_RATE,
        rate_window: float = DEFAULT_RATE_WINDOW,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        auth: tuple[str, str] | None = None,
    ) -> None:
        if min_rate < 0 or rate_window <= 0 or idle_timeout <= 0:
            raise UsageError("min_rate must be >= 0, rate_window and idle_timeout > 0")
        self.url = url.rstrip("/")
        self.min_rate = min_rate
        self.rate_window = rate_window
        # A plain-HTTP upstream's blobs are read straight into 1 MiB buffers (httpx's own
        # stack costs about 1 s more CPU per GiB); https:// and a proxy from the
        # environment stay on httpx's transports.
        plain = transport is None and not {"http", "all"} & set(urllib.request.getproxies())
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=10.0, read=min(timeout, idle_timeout)),
            follow_redirects=True,
            transport=transport,
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
            mounts={"http://": PlainHttpTransport(max_connections=16)} if plain else None,
        )
        self._tokens: dict[str, tuple[str, float]] = {}
        #: Basic credentials (user, password): sent to the token realm, or to the registry
        #: itself when it asks for Basic auth. Never logged.
        self._auth = httpx.BasicAuth(*auth) if auth is not None else None

    @classmethod
    def from_config(cls, config: Mapping[str, str], *,
                    auth: tuple[str, str] | None = None) -> RegistryUpstream:
        """Entry-point factory: ``url``; ``timeout`` (s); ``min_rate`` (bytes/s, 0: none),
        ``rate_window`` (s) and ``idle_timeout`` (s) bound slow transfers; ``auth`` (user,
        password) for a registry that wants credentials."""
        url = config.get("url", DEFAULT_UPSTREAM)
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"upstream URL must start with http:// or https://, got {url!r}")
        unknown = set(config) - {"url", "timeout", "min_rate", "rate_window", "idle_timeout"}
        if unknown:
            raise UsageError(f"unknown upstream option(s) {', '.join(sorted(unknown))} (known: "
                             "timeout, min_rate, rate_window, idle_timeout)")

        def number(key: str, default: float) -> float:
            try:
                return float(config.get(key, default))
            except ValueError:
                raise UsageError(f"upstream option {key} must be a number, got "
                                 f"{config[key]!r}") from None

        return cls(url, timeout=number("timeout", 60),
                   min_rate=number("min_rate", DEFAULT_MIN_RATE),
                   rate_window=number("rate_window", DEFAULT_RATE_WINDOW),
                   idle_timeout=number("idle_timeout", DEFAULT_IDLE_TIMEOUT), auth=auth)

    async def aclose(self) -> None:
        await self._client.aclose()
        await super().aclose()

    async def _token(self, challenge: Mapping[str, str], scope: str) -> str:
        cached = self._tokens.get(scope)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        realm = challenge.get("realm")
        if not realm:
            raise UpstreamError("upstream asked for a bearer token without a realm")
        params = {"service": challenge.get("service", ""), "scope": challenge.get("scope", scope)}
        try:
            resp = await self._client.get(realm, params=params, auth=self._auth or
                                          httpx.USE_CLIENT_DEFAULT)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"token request to {realm} failed: {_why(exc)}") from None
        if resp.status_code != 200:
            raise UpstreamError(
                f"token request to {realm} answered {resp.status_code}", status=resp.status_code
            )
        try:
            data: Any = resp.json()
            token = data.get("token") or data.get("access_token")
            expires = float(data.get("expires_in", 60))
        except (ValueError, AttributeError, TypeError):
            raise UpstreamError(f"token response from {realm} is not JSON") from None
        if not isinstance(token, str) or not token:
            raise UpstreamError(f"token response from {realm} has no token")
        self._tokens[scope] = (token, time.monotonic() + max(expires - 10, 5))
        return token

    async def _send(
        self, method: str, url: str, scope: str, headers: dict[str, str]
    ) -> httpx.Response:
        basic = False
        for attempt in range(2):
            cached = self._tokens.get(scope)
            hdrs = dict(headers)
            if cached and cached[1] > time.monotonic():
                hdrs["Authorization"] = f"Bearer {cached[0]}"
            request = self._client.build_request(method, url, headers=hdrs)
            if basic and self._auth is not None:
                request = next(self._auth.auth_flow(request))
            try:
                resp = await self._client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise UpstreamError(f"upstream {self.url} unreachable: {_why(exc)}") from None
            if resp.status_code != 401 or attempt:
                return resp
            www = resp.headers.get("www-authenticate", "")
            challenge = parse_bearer_challenge(www)
            await resp.aclose()
            if challenge is None and self._auth is not None and www.lower().startswith("basic"):
                basic = True
                continue
            if challenge is None:
                raise UpstreamError("upstream requires authentication we cannot do", status=401)
            await self._token(challenge, scope)
        raise AssertionError("unreachable")

    async def open(self, locator: str, *, accept: Sequence[str] = ()) -> UpstreamResponse:
        self._check_open()
        m = _LOCATOR.fullmatch(locator)
        if not m:
            raise UsageError(f"bad upstream locator {locator!r}")
        repo, kind, ref = m["repo"], m["kind"], m["ref"]
        url = f"{self.url}/v2/{repo}/{kind}/{ref}"
        headers = {"Accept": ", ".join(accept)} if accept else {}
        resp = await self._send("GET", url, f"repository:{repo}:pull", headers)
        if resp.status_code != 200:
            await resp.aclose()
            if resp.status_code == 404:
                raise UpstreamNotFound(f"upstream has no {kind[:-1]} {repo}:{ref}", status=404)
            raise UpstreamError(
                f"upstream answered {resp.status_code} for {kind[:-1]} {repo}:{ref}",
                status=resp.status_code,
            )
        digest: Digest | None = None
        header_digest = resp.headers.get("docker-content-digest")
        if header_digest:
            try:
                digest = Digest.parse(header_digest)
            except DigestError:
                digest = None
        size_header = resp.headers.get("content-length")
        size = int(size_header) if size_header and size_header.isdigit() else None
        media_type = resp.headers.get("content-type", "application/octet-stream").split(";")[0]

        body = _ResponseBody(resp, f"{repo}:{ref}", min_rate=self.min_rate,
                             window=self.rate_window)
        return UpstreamResponse(media_type=media_type, size=size, digest=digest, body=body)


def _why(exc: httpx.HTTPError) -> str:
    """An httpx error as a sentence for users (never a Python repr)."""
    detail = str(exc).strip()
    if isinstance(exc, httpx.TimeoutException):
        what = "timed out"
    elif isinstance(exc, httpx.ConnectError):
        what = "cannot connect"
    elif isinstance(exc, httpx.RemoteProtocolError):
        what = "the server broke the HTTP protocol"
    elif isinstance(exc, httpx.NetworkError):
        what = "network error"
    else:
        what = "request failed"
    return f"{what} ({detail})" if detail else what
