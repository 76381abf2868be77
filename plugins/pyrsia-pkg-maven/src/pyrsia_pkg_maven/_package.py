"""The Maven package type: builds GAVs from an upstream repository, serves ``/maven2``.

Uses only pyrsia_core's public API: the node hands the app a
:class:`~pyrsia_core.interfaces.PackageHost`, and everything served comes from it
(verified against the transparency log). Checksum files are computed here from
those verified bytes; ``maven-metadata.xml`` is written here from the log's
versions (plus, on a build node, the versions the upstream lists, which are built
on request).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator, Mapping, MutableMapping, Sequence
from typing import Any, Final

import httpx
from pyrsia_core.errors import ArtifactUnavailable, PyrsiaError, TransportError
from pyrsia_core.interfaces import (
    ArtifactSink,
    ASGIApp,
    BuiltArtifact,
    LoggedArtifact,
    PackageHost,
    PackageType,
    VerifiedBlob,
    send_verified_blob,
)

from pyrsia_core import Digest

from ._model import (
    POM_TYPE,
    FileRequest,
    Gav,
    MetadataRequest,
    Pom,
    PomError,
    metadata_xml,
    parse_metadata,
    parse_path,
)

__all__ = ["DEFAULT_UPSTREAM", "RECORD_TYPE", "MavenPackageType", "MavenUpstreamError"]

log = logging.getLogger("pyrsia.maven")
DEFAULT_UPSTREAM: Final = "https://repo1.maven.org/maven2"
RECORD_TYPE: Final = "Maven2"
MAX_FILE = 512 * 1024 * 1024
_CONTENT_TYPES: Final = {"pom": POM_TYPE, "xml": POM_TYPE, "jar": "application/java-archive",
                         "war": "application/java-archive", "ear": "application/java-archive"}

Scope = MutableMapping[str, Any]


class MavenUpstreamError(TransportError):
    """The upstream Maven repository failed (other than "not found")."""


class MavenPackageType(PackageType):
    """Maven artifacts: ``package_specific_id`` ``group:artifact:version``, one record per file.

    Config: ``upstream`` (a Maven repository URL, default Maven Central), ``timeout``
    (seconds per upstream request, default 60) and ``max_file_bytes`` (largest file
    built, default 512 MiB; files stream into the node, so this bounds disk, not memory).
    """

    name = "maven"
    record_type = RECORD_TYPE
    mount_path = "/maven2"
    id_param = "gav"
    id_example = "junit:junit:4.13.2"

    def __init__(self, upstream: str = DEFAULT_UPSTREAM, *, timeout: float = 60.0,
                 max_file: int = MAX_FILE) -> None:
        if not upstream.startswith(("http://", "https://")):
            raise ValueError(f"Maven upstream {upstream!r} must be an http(s) URL")
        self.upstream = upstream.rstrip("/")
        self.timeout = timeout
        self.max_file = max_file

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> MavenPackageType:
        return cls(config.get("upstream") or DEFAULT_UPSTREAM,
                   timeout=float(config.get("timeout") or 60.0),
                   max_file=int(config.get("max_file_bytes") or MAX_FILE))

    # -- pure --------------------------------------------------------------------------

    def parse_package_id(self, text: str) -> str:
        """``junit:junit:4.13.2`` (surrounding blanks dropped); ``ValueError`` otherwise."""
        return str(Gav.parse(text))

    def references(self, content: bytes, media_type: str) -> list[tuple[Digest, str]]:
        """A POM points to no digests: checked to be a POM, it yields ``[]``."""
        if media_type not in (POM_TYPE, "text/xml"):
            raise ValueError(f"not a Maven POM: media type {media_type!r:.80}")
        Pom.parse(content)
        return []

    # -- upstream ----------------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=self.timeout, trust_env=False, follow_redirects=True)

    async def _get(self, client: httpx.AsyncClient, path: str) -> bytes | None:
        """A file of the upstream repository, or ``None`` if it has none."""
        url = f"{self.upstream}/{path}"
        try:
            async with client.stream("GET", url) as resp:
                if resp.status_code in (404, 410):
                    return None
                if resp.status_code != 200:
                    raise MavenUpstreamError(f"upstream {url} answered {resp.status_code}")
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.aiter_bytes():
                    size += len(chunk)
                    if size > MAX_FILE:
                        raise MavenUpstreamError(f"upstream file {url} is too large")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPError as exc:
            detail = str(exc).strip() or type(exc).__name__
            raise MavenUpstreamError(f"upstream request for {url} failed: {detail}") from None

    async def _stream_into(
        self, client: httpx.AsyncClient, path: str, sink: ArtifactSink
    ) -> tuple[Digest, int, str] | None:
        """Stream a file of the upstream into ``sink`` (never whole in memory): its
        digest, size and SHA-1; ``None`` if the upstream has no such file."""
        url = f"{self.upstream}/{path}"
        sha1 = hashlib.sha1()
        try:
            async with client.stream("GET", url) as resp:
                if resp.status_code in (404, 410):
                    return None
                if resp.status_code != 200:
                    raise MavenUpstreamError(f"upstream {url} answered {resp.status_code}")

                async def chunks() -> AsyncIterator[bytes]:
                    size = 0
                    async for chunk in resp.aiter_bytes(1 << 20):
                        size += len(chunk)
                        if size > self.max_file:
                            raise MavenUpstreamError(f"upstream file {url} is too large")
                        sha1.update(chunk)
                        yield chunk

                info = await sink.store(chunks())
        except httpx.HTTPError as exc:
            detail = str(exc).strip() or type(exc).__name__
            raise MavenUpstreamError(f"upstream request for {url} failed: {detail}") from None
        return info.digest, info.size, sha1.hexdigest()

    async def _checked(self, client: httpx.AsyncClient, path: str, sha1: str) -> None:
        """If the upstream publishes a ``.sha1`` for the file, the bytes must match it."""
        published = await self._get(client, path + ".sha1")
        if published is None:
            return
        text = published.decode("ascii", "replace").strip().split()
        if text and len(text[0]) == 40 and text[0].lower() != sha1:
            raise MavenUpstreamError(f"upstream {self.upstream}/{path} does not match its "
                                     "published .sha1")

    async def _build_into(
        self, package_id: str, artifact_ids: Sequence[str], sink: ArtifactSink
    ) -> AsyncIterator[BuiltArtifact]:
        """The GAV's POM, its main artifact (unless packaging ``pom``; if the upstream has
        it) and every requested file of the GAV (e.g. a classifier jar). The POM is
        parsed, so it is read into memory; every other file streams into ``sink``."""
        gav = Gav.parse(package_id)
        wanted: list[str] = []
        for artifact_id in artifact_ids:
            try:
                request = parse_path(artifact_id)
            except ValueError as exc:
                raise ArtifactUnavailable(f"{artifact_id!r:.200} is not a Maven file: "
                                          f"{exc}") from None
            if not isinstance(request, FileRequest) or request.gav != gav or (
                    request.checksum is not None or request.path != artifact_id):
                raise ArtifactUnavailable(f"{artifact_id!r:.200} is not a file of {gav}")
            wanted.append(artifact_id)
        async with self._client() as client:
            pom_bytes = await self._get(client, gav.pom_path)
            if pom_bytes is None:
                raise ArtifactUnavailable(f"{gav} not found upstream ({gav.pom_path})")
            try:
                pom = Pom.parse(pom_bytes)
                pom.check(gav)
            except PomError as exc:
                raise MavenUpstreamError(f"upstream POM of {gav} is bad: {exc}") from None
            await self._checked(client, gav.pom_path, hashlib.sha1(pom_bytes).hexdigest())
            log.info("Fetched %s from the Maven upstream (%d bytes)", gav.pom_path,
                     len(pom_bytes))
            yield BuiltArtifact(gav.pom_path, Digest.of(pom_bytes), pom_bytes, POM_TYPE)
            done = {gav.pom_path}
            ext = pom.extension
            main = gav.path(ext) if ext is not None else None
            for path in ([main] if main else []) + wanted:
                if path in done:
                    continue
                done.add(path)
                stored = await self._stream_into(client, path, sink)
                if stored is None:
                    if path in wanted:
                        raise ArtifactUnavailable(f"{path} not found upstream")
                    log.info("%s has no %s upstream; only its POM is logged", gav, path)
                    continue
                digest, size, sha1 = stored
                await self._checked(client, path, sha1)
                log.info("Fetched %s from the Maven upstream (%d bytes)", path, size)
                yield BuiltArtifact(path, digest, media_type=_content_type(path), size=size)

    async def upstream_metadata(self, path: str) -> Any:
        """The upstream's ``maven-metadata.xml`` at ``path`` (parsed), or ``None``."""
        try:
            async with self._client() as client:
                content = await self._get(client, path)
            return parse_metadata(content) if content is not None else None
        except (PyrsiaError, PomError) as exc:
            log.warning("Upstream %s unusable: %s", path, exc)
            return None

    # -- serving -----------------------------------------------------------------------

    def asgi_app(self, host: PackageHost) -> ASGIApp:
        return MavenApp(self, host)


def _content_type(path: str) -> str:
    return _CONTENT_TYPES.get(path.rpartition(".")[2], "application/octet-stream")


def _checksum(data: bytes, algo: str) -> bytes:
    return hashlib.new(algo, data).hexdigest().encode()


class MavenApp:
    """``GET|HEAD /maven2/<group path>/<artifact>/<version>/<file>`` and ``maven-metadata.xml``."""

    def __init__(self, package_type: MavenPackageType, host: PackageHost) -> None:
        self.package_type = package_type
        self.host = host

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        method = scope.get("method", "GET")
        head = method == "HEAD"
        path: str = scope.get("path", "/")
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if method not in ("GET", "HEAD"):
            await _error(send, 405, "UNSUPPORTED", f"{method} is not supported (read-only "
                         "repository)", head)
            return
        try:
            request = parse_path(path)
        except ValueError as exc:
            await _error(send, 400, "BAD_PATH", str(exc), head)
            return
        try:
            if isinstance(request, FileRequest):
                found = await self._file(request)
                if isinstance(found, VerifiedBlob):
                    headers = [(b"content-type", _content_type(request.path).encode()),
                               (b"content-length", str(found.size).encode())]
                    await send_verified_blob(scope, send, 200, headers, found)
                    return
                status, body, ctype = found
            else:
                status, body, ctype = await self._metadata(request)
        except ArtifactUnavailable as exc:
            await _error(send, 502, "UNAVAILABLE", str(exc), head)
            return
        if status != 200:
            await _error(send, status, "NOT_FOUND", body.decode(), head)
            return
        headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else body})

    async def _artifacts(self, gav: Gav, path: str) -> tuple[list[LoggedArtifact], str]:
        """The GAV's logged files; built first if ``path`` (or the GAV) is not logged."""
        package_id = str(gav)
        artifacts = await self.host.artifacts(package_id)
        if any(a.artifact_id == path for a in artifacts):
            return artifacts, ""
        # A GAV not logged yet, or a file the default build lacks (a classifier jar).
        info = await self.host.build(package_id, artifact_ids=[path])
        if info.status in ("SUCCESS", "EXISTS"):
            return await self.host.artifacts(package_id), ""
        if info.status == "REQUESTED":
            return [], f"{gav} is not in the transparency log yet; build {info.build_id} " \
                       "requested from a build node"
        if info.status == "NOT_FOUND":
            return [], info.reason or f"{gav} not found upstream"
        raise ArtifactUnavailable(f"build of {gav} failed: {info.reason}")

    async def _file(self, request: FileRequest) -> tuple[int, bytes, str] | VerifiedBlob:
        """The verified file (streamed by the caller), its checksum, or an error."""
        artifacts, why = await self._artifacts(request.gav, request.path)
        match = [a for a in artifacts if a.artifact_id == request.path]
        if not match:
            return 404, (why or f"{request.path} is not part of {request.gav} in the "
                         "transparency log").encode(), ""
        blob = await self.host.open_artifact(match[0])
        if request.checksum is None:
            return blob
        hasher = hashlib.new(request.checksum)
        async for chunk in blob.open():
            hasher.update(chunk)
        return 200, hasher.hexdigest().encode(), "text/plain"

    async def _metadata(self, request: MetadataRequest) -> tuple[int, bytes, str]:
        upstream = None
        if self.host.is_build_node:
            upstream = await self.package_type.upstream_metadata(request.upstream_path)
        as_artifact = request.as_artifact
        versions: set[str] = set()
        if as_artifact is not None:
            group, artifact = as_artifact
            for package_id in await self.host.package_ids(f"{group}:{artifact}:"):
                versions.add(package_id.rsplit(":", 1)[1])
        if upstream is not None and upstream.plugins and not upstream.versions:
            body = metadata_xml(group=".".join(request.segments), artifact=None,
                                plugins=upstream.plugins)
        elif as_artifact is not None and (versions or (upstream and upstream.versions)):
            versions.update(upstream.versions if upstream is not None else ())
            body = metadata_xml(group=as_artifact[0], artifact=as_artifact[1],
                                versions=versions,
                                last_updated=upstream.last_updated if upstream else "")
        else:
            return 404, f"no versions known for {request.upstream_path}".encode(), ""
        if request.checksum is not None:
            return 200, _checksum(body, request.checksum), "text/plain"
        return 200, body, POM_TYPE


async def _error(send: Any, status: int, code: str, message: str, head: bool) -> None:
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode() + b"\n"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": b"" if head else body})
