"""The OCI Distribution pull API as an ASGI app (any repository name).

The node mounts it at ``/v2`` (it is the Docker package type's app); it reads paths
relative to ``root_path``, and everything it serves comes through the node's
:class:`~pyrsia_core.interfaces.PackageHost` (or a running build, verified).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import attrs
from pyrsia_core.asgi import (
    Receive,
    Scope,
    Send,
    header_values,
    lifespan,
    route_path,
    send_bytes,
    send_json,
)
from pyrsia_core.errors import (
    BlobNotFound,
    BuildFailed,
    BuildsBusy,
    DigestError,
    DigestMismatch,
    PyrsiaError,
    QuotaExceeded,
    StoreError,
    TransferAborted,
)
from pyrsia_core.interfaces import send_verified_blob

from pyrsia_core import Digest, provenance

from ._model import (
    DOCKER_HUB,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    ImageRef,
    Manifest,
    ManifestError,
    ReferenceError_,
    choose_platform,
    reference_text,
    split_registry,
    validate_registry,
    validate_repository,
    validate_tag,
)
from ._referrers import referrers_index, tag_schema_digest, tag_schema_tag
from ._service import DockerService, NotInLog
from ._upstream import UpstreamError

__all__ = ["OciApp"]

log = logging.getLogger("pyrsia.oci")
API_VERSION: Final = ("docker-distribution-api-version", "registry/2.0")
_RANGE: Final = re.compile(r"bytes=(\d*)-(\d*)", re.ASCII)
#: Digits of a Range position: more than any size (and than ``int()`` parses cheaply).
_RANGE_DIGITS: Final = 19
_PULL: Final = frozenset({"GET", "HEAD"})
_PUSH: Final = frozenset({"PUT", "POST", "PATCH", "DELETE"})
T = TypeVar("T")


class OciError(Exception):
    def __init__(self, status: int, code: str, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.detail = status, code, message, detail


def _accepted(scope: Scope) -> set[str]:
    """The media types every ``Accept`` line names (clients send one line per type).

    Parameters are ignored except ``q=0``, which excludes a type. The server bounds the size of
    a request head, so even a pathological header is a bounded amount of work.
    """
    types: set[str] = set()
    for line in header_values(scope, "accept"):
        for part in line.split(","):
            media, _, params = part.partition(";")
            media = media.strip().lower()
            if not media or _refused(params):
                continue
            types.add(media)
    return types


def _refused(params: str) -> bool:
    """``True`` for ``q=0`` (or ``q=0.0``...) among ``;``-separated parameters."""
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "q":
            try:
                return float(value.strip()) <= 0
            except ValueError:
                return False
    return False


@attrs.define(eq=False)
class OciApp:
    """``GET|HEAD /v2/``, manifests, blobs (Range), tags/list and referrers (with the tag
    schema's ``sha256-<hex>`` tags); pushes are refused."""

    service: DockerService

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        head = scope["method"] == "HEAD"
        provenance.take()  # a note left by an earlier request on this connection is not ours
        try:
            await self._dispatch(scope, send)
        except TransferAborted:
            raise  # a blob in flight failed mid-response: the node cuts the connection
        except OciError as exc:
            await self._error(send, exc, head=head)
        except BuildsBusy as exc:
            log.warning("%s %s: %s", scope["method"], scope.get("path"), exc)
            await self._error(send, OciError(429, "TOOMANYREQUESTS", str(exc)), head=head,
                              headers=[("retry-after", "5")])
        except QuotaExceeded as exc:
            # Said on the manifest, before a client starts an image it could not finish.
            log.warning("%s %s: %s", scope["method"], scope.get("path"), exc)
            await self._error(send, OciError(507, "DENIED", f"disk quota: {exc}"), head=head)
        except BuildFailed as exc:
            log.warning("%s %s: %s", scope["method"], scope.get("path"), exc)
            status, code = (404, "MANIFEST_UNKNOWN") if "not found upstream" in str(exc) else (
                503, "UNAVAILABLE")
            await self._error(send, OciError(status, code, str(exc)), head=head)
        except UpstreamError as exc:
            # Re-fetching a logged artifact the cache no longer holds failed upstream.
            log.warning("%s %s: %s", scope["method"], scope.get("path"), exc)
            await self._error(send, OciError(503, "UNAVAILABLE", str(exc)), head=head)
        except (StoreError, PyrsiaError) as exc:
            log.error("%s %s failed: %s", scope["method"], scope.get("path"), exc)
            await self._error(send, OciError(500, "UNKNOWN", f"internal error: {exc}"), head=head)

    async def _error(self, send: Send, exc: OciError, *, head: bool,
                     headers: list[tuple[str, str]] | None = None) -> None:
        body = {"errors": [{"code": exc.code, "message": exc.message, "detail": exc.detail}]}
        await send_json(send, exc.status, body, [API_VERSION, *(headers or [])], head=head)

    async def _dispatch(self, scope: Scope, send: Send) -> None:
        path = route_path(scope)
        if str(scope.get("root_path", "")).endswith("/v2"):
            path = "/v2" + path  # mounted at /v2 (the node): the API's own paths
        method = scope["method"]
        head = method == "HEAD"
        if path in ("/v2", "/v2/"):
            if method not in _PULL:
                raise OciError(405, "UNSUPPORTED", f"{method} is not supported")
            await send_json(send, 200, {}, [API_VERSION], head=head)
            return
        if not path.startswith("/v2/"):
            raise OciError(404, "NOT_FOUND", f"no route for {path[:200]}")
        rest = path[4:]
        name, kind, ref = _split(rest)
        registry, name = _route(scope, name, self.service.registries)
        if kind == "uploads" or method in _PUSH:
            raise OciError(405, "UNSUPPORTED", "this pyrsia node is a pull-only mirror; push is "
                           "not supported")
        if method not in _PULL:
            raise OciError(405, "UNSUPPORTED", f"{method} is not supported")
        try:
            validate_repository(name)
        except ReferenceError_ as exc:
            raise OciError(400, "NAME_INVALID", str(exc), {"name": name[:256]}) from None
        if kind == "tags":
            await self._tags(scope, send, name, registry)
        elif kind == "manifests":
            await self._manifest(scope, send, name, ref, registry)
        elif kind == "referrers":
            await self._referrers(scope, send, name, ref, registry)
        else:
            await self._blob(scope, send, name, ref, registry)

    # -- tags ------------------------------------------------------------------------

    async def _tags(self, scope: Scope, send: Send, name: str,
                    registry: str = DOCKER_HUB) -> None:
        query = _query(scope)
        short = ImageRef(name, "latest", None, registry).short_name
        tags = await self.service.tags(short)
        if not tags:
            raise OciError(404, "NAME_UNKNOWN", f"repository {name} is not known", {"name": name})
        last = query.get("last")
        if last:
            tags = [t for t in tags if t > last]
        headers = [API_VERSION]
        n_text = query.get("n")
        if n_text is not None:
            if not n_text.isdigit():
                raise OciError(400, "PAGINATION_NUMBER_INVALID",
                               "n must be a non-negative integer")
            n = int(n_text)
            if len(tags) > n:
                tags = tags[:n]
                if tags:
                    link = f'</v2/{name}/tags/list?n={n}&last={tags[-1]}>; rel="next"'
                    headers.append(("link", link))
        await send_json(send, 200, {"name": name, "tags": tags}, headers,
                        head=scope["method"] == "HEAD")

    # -- manifests -------------------------------------------------------------------

    async def _manifest(self, scope: Scope, send: Send, name: str, reference: str,
                        registry: str = DOCKER_HUB) -> None:
        if reference.startswith("sha256:") or ":" in reference:
            try:
                ref = ImageRef(name, None, Digest.parse(reference), registry)
            except DigestError as exc:
                raise OciError(400, "DIGEST_INVALID", str(exc)) from None
        else:
            subject = tag_schema_digest(reference)
            if subject is not None:
                await self._tag_schema(scope, send, name, subject, registry)
                return
            try:
                ref = ImageRef(name, validate_tag(reference), None, registry)
            except ReferenceError_ as exc:
                raise OciError(400, "MANIFEST_INVALID", str(exc)) from None
        shown = _shown(name, registry)
        log.info("Fetching manifest for %s", reference_text(shown, reference))
        try:
            resolved = await _healing(lambda: self.service.resolve_manifest(ref), ref)
        except NotInLog as exc:
            raise OciError(404, "MANIFEST_UNKNOWN", str(exc)) from None
        except ManifestError as exc:
            raise OciError(404, "MANIFEST_UNKNOWN", f"stored manifest unusable: {exc}") from None
        digest, content, media_type = resolved.digest, resolved.content, resolved.media_type
        accepted = _accepted(scope)
        if (
            media_type in INDEX_TYPES
            and accepted
            and media_type not in accepted
            and "*/*" not in accepted
            and ({DOCKER_MANIFEST, OCI_MANIFEST} & accepted)
        ):
            # A client that cannot read indexes gets the linux/amd64 image, as registries do.
            chosen = choose_platform(Manifest.parse(content, media_type))
            if chosen is None:
                raise OciError(404, "MANIFEST_UNKNOWN", "no linux/amd64 image in this index, and "
                               "the client does not accept indexes")
            digest = chosen.digest
            content = await _healing(lambda: self.service.verified_bytes(ref, digest), ref)
            media_type = Manifest.parse(content).media_type
        _log_served("Manifest", reference_text(shown, reference), digest,
                    "a new build (pulled from upstream)" if resolved.source == "build"
                    else None)
        await send_bytes(
            send,
            200,
            content,
            [API_VERSION, ("docker-content-digest", str(digest)), ("etag", f'"{digest}"')],
            content_type=media_type,
            head=scope["method"] == "HEAD",
        )

    # -- referrers (OCI 1.1) -----------------------------------------------------------

    async def _referrers(self, scope: Scope, send: Send, name: str, reference: str,
                         registry: str = DOCKER_HUB) -> None:
        """``GET /v2/<name>/referrers/<digest>[?artifactType=]``: an image index of the
        logged manifests whose ``subject`` is ``<digest>`` (empty, 200, for none)."""
        try:
            digest = Digest.parse(reference)
        except DigestError as exc:
            raise OciError(400, "DIGEST_INVALID", str(exc), {"digest": reference[:100]}
                           ) from None
        image = ImageRef(name, None, digest, registry)
        found = await _healing(lambda: self.service.referrers(image, digest), image)
        headers = [API_VERSION]
        artifact_type = _query(scope).get("artifactType")
        if artifact_type is not None:
            found = [r for r in found if r.artifact_type == artifact_type]
            headers.append(("oci-filters-applied", "artifactType"))
        body = referrers_index(found)
        log.info("Referrers of %s@%s: %d", name, digest, len(found))
        await send_bytes(send, 200, body, headers, content_type=OCI_INDEX,
                         head=scope["method"] == "HEAD")

    async def _tag_schema(self, scope: Scope, send: Send, name: str, subject: Digest,
                          registry: str = DOCKER_HUB) -> None:
        """The tag schema's ``<alg>-<hex>`` tag: the referrers index of ``subject`` as a
        manifest (its digest is the same for the same referrers), 404 with none."""
        ref = ImageRef(name, None, subject, registry)
        found = await _healing(lambda: self.service.referrers(ref, subject), ref)
        if not found:
            raise OciError(404, "MANIFEST_UNKNOWN", f"{subject} of {name} has no referrers in "
                           "the transparency log", {"tag": tag_schema_tag(subject)})
        body = referrers_index(found)
        digest = Digest.of(body)
        await send_bytes(
            send, 200, body,
            [API_VERSION, ("docker-content-digest", str(digest)), ("etag", f'"{digest}"')],
            content_type=OCI_INDEX, head=scope["method"] == "HEAD")

    # -- blobs -----------------------------------------------------------------------

    async def _blob(self, scope: Scope, send: Send, name: str, reference: str,
                    registry: str = DOCKER_HUB) -> None:
        try:
            digest = Digest.parse(reference)
        except DigestError as exc:
            raise OciError(400, "DIGEST_INVALID", str(exc)) from None
        ref = ImageRef(name, None, digest, registry)
        try:
            blob = await self.service.ensure_blob(ref, digest)
        except NotInLog as exc:
            raise OciError(404, "BLOB_UNKNOWN", str(exc), {"digest": str(digest)}) from None
        except BlobNotFound as exc:
            raise OciError(404, "BLOB_UNKNOWN", str(exc), {"digest": str(digest)}) from None
        size = blob.size
        status, offset, count = 200, 0, size
        headers: list[tuple[str, str]] = [
            API_VERSION,
            ("content-type", "application/octet-stream"),
            ("docker-content-digest", str(digest)),
            ("etag", f'"{digest}"'),
            ("accept-ranges", "bytes"),
            ("cache-control", "max-age=31536000"),
        ]
        ranges = header_values(scope, "range")
        if ranges:
            parsed = _parse_range(ranges[0], size)
            if parsed is None:
                await send_bytes(
                    send, 416, b"", [API_VERSION, ("content-range", f"bytes */{size}")],
                )
                return
            if parsed != (0, size):
                offset, end = parsed
                count = end - offset
                status = 206
                headers.append(("content-range", f"bytes {offset}-{end - 1}/{size}"))
        headers.append(("content-length", str(count)))
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        sent = False

        async def sending(message: Any) -> None:
            nonlocal sent
            sent = True
            await send(message)

        try:
            await send_verified_blob(scope, sending, status, raw, blob, offset=offset,
                                     length=count)
        except TransferAborted as exc:
            if sent:
                raise  # cut short: the node closes the connection
            raise OciError(404, "BLOB_UNKNOWN", f"{digest} could not be fetched: {exc}",
                           {"digest": str(digest)}) from None
        # Logged once served: a blob that streamed as it arrived names its source now.
        origin = blob.origin() if blob.origin is not None else None
        if origin:
            provenance.note(origin, blob.size)
        if scope["method"] != "HEAD":
            _log_served("Blob", _shown(name, registry), digest, None, f"{count} bytes" + (
                f", range {offset}-{offset + count - 1}" if status == 206 else ""))


def _shown(name: str, registry: str) -> str:
    """The repository as logs show it: Docker Hub's as before, another's with its host."""
    return name if registry == DOCKER_HUB else f"{registry}/{name}"


def _log_served(kind: str, image: str, digest: Digest, built: str | None,
                detail: str = "") -> None:
    """The one line per manifest or blob served: which image, and where its bytes came from
    (``served from cache``, ``pulled from peer <node id>``, ``pulled from upstream <url>``)."""
    fetched = provenance.take()
    source = f"served from {built}" if built else (fetched or "served from cache")
    if fetched and not built:
        source += ", verified"
    log.info("%s %s of %s %s%s", kind, digest, image, source, f" ({detail})" if detail else "",
             extra={"image": image, "digest": str(digest), "source": source,
                    "artifact": kind.lower()})


async def _healing(call: Callable[[], Awaitable[T]], ref: ImageRef) -> T:
    """``call()``, once more if a stored manifest failed its re-hash.

    The service drops a stored copy whose bytes no longer match their digest (disk corruption,
    tampering), so the second attempt fetches a verified copy again; bad bytes are never served.
    """
    try:
        return await call()
    except DigestMismatch as exc:
        log.warning("Stored copy of a manifest of %s was corrupt and was dropped (%s); "
                    "fetching it again", ref.repository, exc)
    try:
        return await call()
    except DigestMismatch as exc:
        raise OciError(503, "UNAVAILABLE", f"no verified copy of the manifest: {exc}") from None


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """``(start, end_exclusive)`` for a single byte range; ``None`` when unsatisfiable.

    Several ranges, or a malformed header, are ignored (the whole blob is sent).
    """
    m = _RANGE.fullmatch(value.strip())
    if not m or (not m[1] and not m[2]):
        return (0, size)
    if len(m[1]) > _RANGE_DIGITS or len(m[2]) > _RANGE_DIGITS:
        # A position past any blob's end (and past what int() parses cheaply): refused
        # as unsatisfiable, as the reference registry refuses it (Go cannot parse it).
        return None
    if m[1]:
        start = int(m[1])
        end = min(int(m[2]) + 1, size) if m[2] else size
        if m[2] and int(m[2]) < start:
            return (0, size)
        if start >= size:
            return None
        return (start, end)
    suffix = int(m[2])
    if suffix == 0:
        return None
    return (max(0, size - suffix), size)


def _route(scope: Scope, name: str, mirrored: frozenset[str]) -> tuple[str, str]:
    """The registry a request is for, and the repository name within it.

    A mirror client (containerd's ``hosts.toml``) names the registry in ``?ns=``; podman
    and skopeo name it as the first path component (``/v2/ghcr.io/org/app/...``); Docker
    Hub otherwise. A registry this node does not mirror is refused before any upstream is
    contacted, as is a ``ns`` the path's registry contradicts.
    """
    ns = _query(scope).get("ns")
    try:
        prefix, rest = split_registry(name)
        wanted = validate_registry(ns) if ns is not None else None
    except ReferenceError_ as exc:
        raise OciError(400, "NAME_INVALID", str(exc), {"name": name[:256]}) from None
    if prefix is not None and wanted is not None and prefix != wanted:
        raise OciError(403, "DENIED", f"the request names the registry {wanted} (ns) and "
                       f"{prefix} (path)", {"name": name[:256], "ns": ns[:100] if ns else ""})
    registry = prefix or wanted or DOCKER_HUB
    if registry not in mirrored:
        log.info("Refused %s/%s: this node mirrors %s only", registry[:100], rest[:256],
                 ", ".join(sorted(mirrored)))
        raise OciError(404, "NAME_UNKNOWN", f"this pyrsia node mirrors "
                       f"{', '.join(sorted(mirrored))}; it does not serve images of "
                       f"{registry[:100]}", {"name": name[:256], "ns": registry[:100]})
    return registry, rest


def _split(rest: str) -> tuple[str, str, str]:
    """``<name>/manifests/<ref>`` etc. -> (name, kind, ref)."""
    if rest.endswith("/tags/list"):
        return rest[: -len("/tags/list")], "tags", ""
    for marker, kind in (("/manifests/", "manifests"), ("/blobs/uploads", "uploads"),
                         ("/blobs/", "blobs"), ("/referrers/", "referrers")):
        i = rest.rfind(marker)
        if i > 0 and (kind == "uploads" or i + len(marker) < len(rest)):
            return rest[:i], kind, rest[i + len(marker):]
    raise OciError(404, "NOT_FOUND", f"no route for /v2/{rest[:200]}")


def _query(scope: Scope) -> dict[str, str]:
    from urllib.parse import parse_qsl

    raw = scope.get("query_string", b"").decode("latin-1")
    return dict(parse_qsl(raw, keep_blank_values=True))
