"""Docker images through the package-type contract: builds, tag resolution, verified blobs.

Everything here uses :mod:`pyrsia_core` only. The node builds an image by calling the
package type's build with an :class:`~pyrsia_core.interfaces.ArtifactSink`: manifests,
configs and layers stream into the node's blob store, verified against the digests the
manifests name, never whole in memory; the node then commits one record per artifact
(the seed's record layout: the tag, ``repository@digest`` for each manifest, config and
layer) through its one commit path.

While a build runs, each artifact becomes servable as soon as it is verified (the
manifests first), so a client pulling the image downloads while the node builds. Once
the build ends only the log decides.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio
import attrs
from pyrsia_core.errors import (
    ArtifactUnavailable,
    BuildFailed,
    DigestMismatch,
    PyrsiaError,
    QuotaExceeded,
)
from pyrsia_core.interfaces import (
    ArtifactSink,
    BuildInfo,
    BuiltArtifact,
    LoggedArtifact,
    PackageHost,
    Upstream,
    VerifiedBlob,
)

from pyrsia_core import Digest, provenance

from ._model import (
    ALL_MANIFEST_TYPES,
    OCI_INDEX,
    Descriptor,
    ImageRef,
    Manifest,
    ManifestError,
    logged_name,
    reference_text,
)
from ._referrers import MAX_REFERRERS, Referrer, referrer_of, tag_schema_tag
from ._upstream import UpstreamError, UpstreamNotFound

__all__ = ["DockerBuilder", "DockerService", "NotInLog", "ResolvedManifest"]

log = logging.getLogger("pyrsia.docker")
RECORD_TYPE = "Docker"
MAX_PARALLEL_BLOBS = 4
#: Seconds a build started by a client's manifest request waits for the client to ask
#: for a blob before it fetches the others (the one the client reads then goes alone).
PULL_WAIT = 0.05
#: Largest manifest (or index) accepted from the upstream.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
#: Most platform manifests an index may name.
MAX_INDEX_MANIFESTS = 256
#: Most bytes of manifests (index and platform manifests together) in one build.
MAX_BUILD_MANIFEST_BYTES = 16 * 1024 * 1024
#: Most artifacts (manifests, configs, layers) one image may have: each is a log record.
MAX_IMAGE_ARTIFACTS = 1000
#: Seconds a "not found upstream" answer is remembered (no upstream request meanwhile).
NEGATIVE_TTL = 30.0
#: Most such answers remembered at once.
NEGATIVE_CACHE_SIZE = 10_000
#: Most small artifacts (manifests) kept read for the referrers API.
SMALL_CACHE_SIZE = 256
#: Largest artifact kept in that cache.
SMALL_CACHE_ENTRY = 64 * 1024
#: Seconds the artifacts of an ended build are remembered, at most, while it commits.
PENDING_KEEP = 600.0


class NotInLog(PyrsiaError, LookupError):
    """No log record vouches for the requested artifact."""


class ImageBuildError(BuildFailed):
    """A build (or the fetch of an artifact) failed; the message says why."""


class ImageNotFound(ImageBuildError, ArtifactUnavailable):
    """The upstream does not have the image."""


@attrs.frozen
class ResolvedManifest:
    digest: Digest
    content: bytes
    media_type: str
    source: str  # "cache", "build"


@attrs.define(eq=False)
class _Pending:
    """An artifact of a build in progress: verified and stored once ``event`` is set."""

    sink: ArtifactSink
    package_id: str
    event: anyio.Event = attrs.Factory(anyio.Event)
    stored: bool = False
    #: Set once the blob streams (``blob``), is stored, or its build ended.
    moved: anyio.Event = attrs.Factory(anyio.Event)
    #: The blob as it arrives, when the sink streams it (its end released once verified).
    blob: VerifiedBlob | None = None
    #: A client asked for it (its fetch goes first); ``demand`` wakes the build's scheduler.
    asked: bool = False
    demand: _Demand | None = None
    #: When the build's fetching ended (it commits next); ``None`` while it fetches.
    finished: float | None = None


@attrs.define(eq=False)
class _Ready:
    """A build's manifests: verified (and the image fits the quota) once ``event`` is set."""

    event: anyio.Event = attrs.Factory(anyio.Event)
    digest: Digest | None = None
    error_type: type[BaseException] | None = None
    reason: str = ""


@attrs.define(eq=False)
class DockerBuilder:
    """The state shared by builds and the app: artifacts of running builds, manifests
    ready, images the upstream does not have."""

    #: Artifacts of builds in progress, by (registry and repository, digest): two builds
    #: of different repositories may share a digest, and each serves it to its own clients.
    pending: dict[tuple[str, Digest], _Pending] = attrs.Factory(dict)
    ready: dict[str, _Ready] = attrs.Factory(dict)
    #: Images the upstream does not have: package id -> (until when, the upstream's answer).
    missing: dict[str, tuple[float, str]] = attrs.Factory(dict)
    #: Small logged artifacts read to find referrers, by digest (content never changes).
    small: dict[Digest, bytes] = attrs.Factory(dict)

    # -- negative cache --------------------------------------------------------------

    def check_missing(self, ref: ImageRef) -> None:
        """Raise at once for an image the upstream said it does not have, a moment ago."""
        entry = self.missing.get(ref.package_id)
        if entry is None:
            return
        if entry[0] > time.monotonic():
            raise ImageNotFound(f"{ref.package_id} not found upstream: {entry[1]} (remembered "
                                f"for {NEGATIVE_TTL:.0f} s)")
        del self.missing[ref.package_id]

    def _remember_missing(self, ref: ImageRef, answer: str) -> None:
        now = time.monotonic()
        if len(self.missing) >= NEGATIVE_CACHE_SIZE:
            for key in [k for k, (until, _) in self.missing.items() if until <= now]:
                del self.missing[key]
            while len(self.missing) >= NEGATIVE_CACHE_SIZE:
                del self.missing[next(iter(self.missing))]
        self.missing[ref.package_id] = (now + NEGATIVE_TTL, answer)

    # -- builds ----------------------------------------------------------------------

    async def build(
        self, ref: ImageRef, upstream: Upstream, sink: ArtifactSink
    ) -> AsyncIterator[BuiltArtifact]:
        """Fetch the image, verify and store everything through ``sink``; its artifacts."""
        self._purge()
        ready = self.ready.get(ref.package_id)
        for_clients = ready is not None  # a client's pull started it and waits
        if ready is None:
            ready = self.ready[ref.package_id] = _Ready()
        mine: list[tuple[str, Digest]] = []
        try:
            artifacts = await self._fetch_image(ref, upstream, sink, mine, ready, for_clients)
        except BaseException as exc:
            if not ready.event.is_set():
                ready.error_type, ready.reason = type(exc), str(exc) or type(exc).__name__
            raise
        finally:
            ready.event.set()
            if self.ready.get(ref.package_id) is ready:
                del self.ready[ref.package_id]
            # The node commits after the build: until then (or the build's failure)
            # its verified artifacts stay servable; the app drops them once settled.
            now = time.monotonic()
            for key in mine:
                pending = self.pending.get(key)
                if pending is not None:
                    pending.finished = now
                    pending.event.set()
                    pending.moved.set()
        for artifact_id, digest, size, media_type in artifacts:
            yield BuiltArtifact(artifact_id, digest, media_type=media_type, size=size)

    def _purge(self, older_than: float = PENDING_KEEP) -> None:
        """Forget artifacts of builds that ended long ago (the log has them, or not)."""
        now = time.monotonic()
        for key in [k for k, p in self.pending.items()
                    if p.finished is not None and now - p.finished > older_than]:
            del self.pending[key]

    def _expect(self, ref: ImageRef, sink: ArtifactSink, digest: Digest,
                mine: list[tuple[str, Digest]]) -> None:
        key = (ref.short_name, digest)
        current = self.pending.get(key)
        if current is None or current.finished is not None:
            self.pending[key] = _Pending(sink, ref.package_id)
            mine.append(key)

    async def settled(self, host: PackageHost, key: tuple[str, Digest]) -> _Pending | None:
        """The running build's entry for ``key``, or ``None`` once its build has ended and
        the node has committed it (or failed): then only the log decides."""
        pending = self.pending.get(key)
        if pending is None or pending.finished is None:
            return pending
        await host.settle(pending.package_id, limit=60.0)
        if self.pending.get(key) is pending:
            del self.pending[key]
        return None

    def _release(self, ref: ImageRef, digest: Digest) -> None:
        pending = self.pending.get((ref.short_name, digest))
        if pending is not None:
            pending.stored = True
            pending.event.set()
            pending.moved.set()

    def _streaming(self, ref: ImageRef, digest: Digest) -> Callable[[VerifiedBlob], None]:
        """What the sink calls once ``digest`` streams: clients waiting for it read it."""

        def started(blob: VerifiedBlob) -> None:
            pending = self.pending.get((ref.short_name, digest))
            if pending is not None and pending.blob is None:
                pending.blob = blob
                pending.moved.set()

        return started

    async def _fetch_manifest(
        self, ref: ImageRef, upstream: Upstream, reference: str, budget: list[int]
    ) -> tuple[Digest, bytes, str]:
        """One manifest from the upstream, at most :data:`MAX_MANIFEST_BYTES` and within
        ``budget`` (``[bytes left]`` for the build's manifests)."""
        log.info("Fetching manifest for %s from upstream",
                 reference_text(ref.repository, reference))
        resp = await upstream.open(
            f"{ref.repository}/manifests/{reference}", accept=ALL_MANIFEST_TYPES
        )
        limit = min(MAX_MANIFEST_BYTES, budget[0])
        chunks: list[bytes] = []
        size = 0
        try:
            if resp.size is not None and resp.size > limit:
                raise self._too_large(ref, reference, budget)
            async for chunk in resp.body:
                size += len(chunk)
                if size > limit:
                    raise self._too_large(ref, reference, budget)
                chunks.append(chunk)
        finally:
            await _close(resp.body)
        budget[0] -= size
        content = b"".join(chunks)
        del chunks
        digest = Digest.of(content)
        if resp.digest is not None and resp.digest != digest:
            raise DigestMismatch(str(resp.digest), str(digest))
        if reference.startswith("sha256:") and str(digest) != reference:
            raise DigestMismatch(reference, str(digest))
        return digest, content, resp.media_type

    @staticmethod
    def _too_large(ref: ImageRef, reference: str, budget: list[int]) -> ImageBuildError:
        if budget[0] < MAX_MANIFEST_BYTES:
            return ImageBuildError(
                f"the manifests of {ref.package_id} are too large: over "
                f"{MAX_BUILD_MANIFEST_BYTES} bytes in all (at {ref.repository}@{reference})")
        return ImageBuildError(f"upstream manifest {ref.repository}:{reference} is too large "
                               f"(over {MAX_MANIFEST_BYTES} bytes)")

    async def _fetch_image(
        self, ref: ImageRef, upstream: Upstream, sink: ArtifactSink,
        mine: list[tuple[str, Digest]], ready: _Ready, for_clients: bool = False,
    ) -> list[tuple[str, Digest, int, str]]:
        """Fetch, verify and store an image; its (artifact id, digest, size, media type).

        Each artifact is released to waiting clients once verified. Each manifest is
        stored as soon as it is verified (only its descriptors are kept), the manifests'
        total size and number and the image's artifacts are bounded, and the image must
        fit in the disk quota before any client is told it exists.
        """
        try:
            budget = [MAX_BUILD_MANIFEST_BYTES]
            top_digest, top, media_type = await self._fetch_manifest(ref, upstream,
                                                                     ref.reference, budget)
            manifest = Manifest.parse(top, media_type)
            artifacts: list[tuple[str, Digest, int, str]] = []
            if ref.tag is not None:
                artifacts.append((ref.package_id, top_digest, len(top), manifest.media_type))
            artifacts.append((ref.artifact_id(top_digest), top_digest, len(top),
                              manifest.media_type))
            unique: dict[Digest, Descriptor] = {}
            manifest_bytes = len(top)

            def add_children(children: Sequence[Descriptor]) -> None:
                for d in children:
                    unique.setdefault(d.digest, d)
                    if len(unique) + len(artifacts) > MAX_IMAGE_ARTIFACTS:
                        raise ImageBuildError(
                            f"{ref.package_id} has too many artifacts: over "
                            f"{MAX_IMAGE_ARTIFACTS} manifests, configs and layers")

            subs = list(manifest.manifests) if manifest.is_index else []
            if len(subs) > MAX_INDEX_MANIFESTS:
                raise ImageBuildError(f"the index of {ref.package_id} names {len(subs)} "
                                      f"manifests, over the limit of {MAX_INDEX_MANIFESTS}")
            self._expect(ref, sink, top_digest, mine)
            for d in subs:
                self._expect(ref, sink, d.digest, mine)
            await self._store_manifest(ref, sink, top_digest, top)
            del top
            if not manifest.is_index:
                add_children(manifest.children)
            for d in subs:
                sub_digest, sub, sub_type = await self._fetch_manifest(ref, upstream,
                                                                       str(d.digest), budget)
                if sub_digest != d.digest:
                    raise DigestMismatch(str(d.digest), str(sub_digest))
                sub_manifest = Manifest.parse(sub, sub_type)
                if sub_manifest.is_index:
                    raise ManifestError("nested indexes are not supported")
                entry = (ref.artifact_id(sub_digest), sub_digest, len(sub),
                         sub_manifest.media_type)
                if entry[:2] not in [a[:2] for a in artifacts]:
                    artifacts.append(entry)
                add_children(sub_manifest.children)
                manifest_bytes += len(sub)
                await self._store_manifest(ref, sink, sub_digest, sub)
                del sub, sub_manifest
            del manifest
            self._check_fits(ref, sink, manifest_bytes, unique.values())
            for d in unique.values():
                artifacts.append((ref.artifact_id(d.digest), d.digest, d.size, d.media_type))
            for _, digest, _, _ in artifacts:
                self._expect(ref, sink, digest, mine)
            ready.digest = top_digest
            ready.event.set()
            # Its referrers (signatures, SBOMs...) once the client has its manifest.
            extra: dict[Digest, Descriptor] = {}

            def add_referrer_children(children: Sequence[Descriptor]) -> None:
                for d in children:
                    if d.digest not in unique:
                        extra.setdefault(d.digest, d)
                    if len(extra) + len(artifacts) > MAX_IMAGE_ARTIFACTS:
                        raise ImageBuildError(
                            f"{ref.package_id} has too many artifacts with its referrers: "
                            f"over {MAX_IMAGE_ARTIFACTS}")

            subjects = [top_digest, *(d.digest for d in subs)]
            referrer_bytes = await self._fetch_referrers(
                ref, upstream, sink, mine, budget, subjects, artifacts, add_referrer_children)
            blobs = [*unique.values(), *extra.values()]
            if referrer_bytes:
                self._check_fits(ref, sink, manifest_bytes + referrer_bytes, blobs)
            for d in extra.values():
                artifacts.append((ref.artifact_id(d.digest), d.digest, d.size, d.media_type))
                self._expect(ref, sink, d.digest, mine)
            await self._fetch_blobs(ref, upstream, sink, blobs, for_clients=for_clients)
        except UpstreamNotFound as exc:
            self._remember_missing(ref, str(exc))
            raise ImageNotFound(f"{ref.package_id} not found upstream: {exc}") from None
        except UpstreamError as exc:
            raise ImageBuildError(f"upstream failed: {exc}") from None
        except (ManifestError, DigestMismatch) as exc:
            raise ImageBuildError(f"upstream sent bad content: {exc}") from None
        return artifacts

    async def _fetch_referrers(
        self, ref: ImageRef, upstream: Upstream, sink: ArtifactSink,
        mine: list[tuple[str, Digest]], budget: list[int], subjects: Sequence[Digest],
        artifacts: list[tuple[str, Digest, int, str]],
        add_children: Callable[[Sequence[Descriptor]], None],
    ) -> int:
        """The referrers (signatures, SBOMs...) the upstream has for each manifest of the
        image (``subjects``): each referrer manifest verified, stored and added to
        ``artifacts`` (its config and layers through ``add_children``); the bytes of
        manifests fetched."""
        fetched = 0
        seen = {digest for _, digest, _, _ in artifacts}
        for subject in dict.fromkeys(subjects):
            for d in await self._upstream_referrers(ref, upstream, subject, budget):
                if d.digest in seen:
                    continue
                seen.add(d.digest)
                digest, content, media_type = await self._fetch_manifest(
                    ref, upstream, str(d.digest), budget)
                if digest != d.digest:
                    raise DigestMismatch(str(d.digest), str(digest))
                referrer = referrer_of(content, digest)
                if referrer is None or referrer.subject != subject:
                    # A stale or wrong tag-schema index: not a referrer of this image.
                    log.warning("Upstream listed %s as a referrer of %s, but its subject "
                                "differs: ignored", digest, subject)
                    continue
                parsed = Manifest.parse(content, media_type)
                if parsed.is_index:
                    raise ManifestError("referrers that are indexes are not supported")
                artifacts.append((ref.artifact_id(digest), digest, len(content),
                                  parsed.media_type))
                add_children(parsed.children)
                fetched += len(content)
                self._expect(ref, sink, digest, mine)
                await self._store_manifest(ref, sink, digest, content)
                log.info("Referrer %s (%s) of %s@%s fetched from upstream", digest,
                         referrer.artifact_type, ref.repository, subject)
        return fetched

    async def _upstream_referrers(
        self, ref: ImageRef, upstream: Upstream, subject: Digest, budget: list[int]
    ) -> list[Descriptor]:
        """The upstream's list of ``subject``'s referrers: its referrers API if it has one,
        else its tag-schema tag (``sha256-<hex>``); none when it has neither."""
        index: bytes | None = None
        try:
            resp = await upstream.open(f"{ref.repository}/referrers/{subject}",
                                       accept=(OCI_INDEX,))
        except PyrsiaError:
            resp = None  # no referrers API (404, 405...): the tag schema then
        if resp is not None:
            chunks: list[bytes] = []
            size = 0
            try:
                async for chunk in resp.body:
                    size += len(chunk)
                    if size > MAX_MANIFEST_BYTES:
                        raise ImageBuildError(f"the upstream's referrers of {subject} are "
                                              f"over {MAX_MANIFEST_BYTES} bytes")
                    chunks.append(chunk)
            finally:
                await _close(resp.body)
            index = b"".join(chunks)
        else:
            try:
                _, index, _ = await self._fetch_manifest(ref, upstream,
                                                         tag_schema_tag(subject), budget)
            except LookupError:  # not found (whatever the upstream's kind): none
                return []
        try:
            listed = Manifest.parse(index, OCI_INDEX)
        except ManifestError as exc:
            listed = None
            why = str(exc)
        else:
            why = "not an image index"
        if listed is None or not listed.is_index:
            # Referrers are extras: an upstream that answers garbage for them still
            # serves the image (without them; the log vouches for nothing else).
            log.warning("Ignored the upstream's referrers of %s@%s: %s", ref.repository,
                        subject, why)
            return []
        if len(listed.manifests) > MAX_REFERRERS:
            raise ImageBuildError(f"{subject} has {len(listed.manifests)} referrers upstream, "
                                  f"over the limit of {MAX_REFERRERS}")
        return list(listed.manifests)

    async def _store_manifest(self, ref: ImageRef, sink: ArtifactSink, digest: Digest,
                              content: bytes) -> None:
        if await sink.open(digest) is None:
            await sink.store(_one(content), expected=digest, size=len(content))
        self._release(ref, digest)

    @staticmethod
    def _check_fits(ref: ImageRef, sink: ArtifactSink, manifest_bytes: int,
                    blobs: Any) -> None:
        """Refuse, before a client is told the image exists, one larger than the quota."""
        quota = sink.quota
        if quota is None:
            return
        total = manifest_bytes + sum(max(0, d.size) for d in blobs)
        if total > quota:
            raise QuotaExceeded(
                f"{ref.package_id} needs {total} bytes, more than this node's disk quota of "
                f"{quota} bytes (pyrsia node start --disk-space)")

    async def _fetch_blobs(
        self, ref: ImageRef, upstream: Upstream, sink: ArtifactSink,
        descriptors: Sequence[Descriptor], *, for_clients: bool = False,
    ) -> None:
        """Fetch the image's blobs, at most :data:`MAX_PARALLEL_BLOBS` at once.

        With ``for_clients`` (a client asked for the image), the blobs clients ask for go
        first, each at once, so that the one a client reads is not slowed by the others;
        while a client asks for blobs, the rest are fetched one at a time when none is in
        flight. Otherwise (a build nobody pulls, or a client that only wanted the
        manifest) all in parallel.
        """
        errors: list[BaseException] = []
        demand = _Demand()
        todo: dict[Digest, Descriptor] = {}
        for d in descriptors:
            todo.setdefault(d.digest, d)
            pending = self.pending.get((ref.short_name, d.digest))
            if pending is not None:
                pending.demand = demand
        running: dict[Digest, bool] = {}  # digest -> asked for by a client

        async def one(d: Descriptor) -> None:
            try:
                if await sink.open(d.digest) is not None:
                    log.info("Blob %s already in the local cache", d.digest)
                    self._release(ref, d.digest)
                    return
                await fetch_blob(ref, upstream, sink, d.digest, d.size, "build",
                                 on_receiving=self._streaming(ref, d.digest))
                self._release(ref, d.digest)
            except PyrsiaError as exc:
                errors.append(exc)
            finally:
                del running[d.digest]
                demand.changed()

        def asked(digest: Digest) -> bool:
            pending = self.pending.get((ref.short_name, digest))
            return pending is not None and pending.asked

        async with anyio.create_task_group() as tg:
            first_wait = for_clients
            pulling = False  # a client has asked for a blob of this build
            while (todo or running) and not errors:
                for digest in [x for x in todo if asked(x)]:
                    if len(running) >= MAX_PARALLEL_BLOBS:
                        break
                    pulling = True
                    running[digest] = True
                    tg.start_soon(one, todo.pop(digest))
                if first_wait and todo and not running:
                    # The client has the manifest: give it a moment to ask for a blob.
                    first_wait = False
                    with anyio.move_on_after(PULL_WAIT):
                        await demand.wait()
                    continue
                while todo and len(running) < MAX_PARALLEL_BLOBS and (
                        not pulling or not running):
                    digest = next(iter(todo))
                    running[digest] = False
                    tg.start_soon(one, todo.pop(digest))
                if todo or running:
                    await demand.wait()
            if errors:
                tg.cancel_scope.cancel()
        if errors:
            raise errors[0]


@attrs.define(eq=False)
class _Demand:
    """Wakes a build's blob scheduler: a client asked for a blob, or a fetch ended."""

    _event: anyio.Event = attrs.Factory(anyio.Event)

    def changed(self) -> None:
        event, self._event = self._event, anyio.Event()
        event.set()

    async def wait(self) -> None:
        await self._event.wait()


async def fetch_blob(
    ref: ImageRef, upstream: Upstream, sink: ArtifactSink, digest: Digest, size: int | None,
    why: str, *, on_receiving: Callable[[VerifiedBlob], None] | None = None,
) -> int:
    """Fetch one artifact by digest from the upstream into ``sink`` (verified); its size.

    An evicted manifest is fetched again through the manifests endpoint (registries
    serve manifests there, not as blobs); either way the digest is checked.
    """
    try:
        try:
            resp = await upstream.open(f"{ref.repository}/blobs/{digest}")
        except UpstreamNotFound:
            if why == "build":
                raise
            resp = await upstream.open(
                f"{ref.repository}/manifests/{digest}", accept=ALL_MANIFEST_TYPES
            )
        try:
            info = await sink.store(resp.body, expected=digest, size=size,
                                    on_receiving=on_receiving)
        finally:
            await _close(resp.body)
    except UpstreamNotFound as exc:
        raise ImageBuildError(f"{digest} not found upstream: {exc}") from None
    except UpstreamError as exc:
        raise ImageBuildError(f"upstream failed: {exc}") from None
    log.info("Blob %s of %s pulled from upstream (%s, %d bytes)", digest, ref.repository, why,
             info.size)
    provenance.note(f"pulled from upstream {getattr(upstream, 'url', 'the upstream')}",
                    info.size)
    return info.size


@attrs.define(eq=False)
class DockerService:
    """Docker images on a node, as the OCI app sees them: every manifest and blob served
    is vouched for by a log record (through the host) or by a running build."""

    builder: DockerBuilder
    host: PackageHost
    #: The registries whose images this node serves (Docker Hub's always).
    registries: frozenset[str] = frozenset({"docker.io"})

    # -- log lookups ---------------------------------------------------------------

    async def _artifacts(self, ref: ImageRef, digest: Digest) -> list[LoggedArtifact]:
        return [a for a in await self.host.artifacts_with_digest(digest)
                if logged_name(a.artifact_id) == ref.short_name
                or logged_name(a.package_id) == ref.short_name]

    async def tag_digest(self, ref: ImageRef) -> Digest | None:
        """The manifest digest the log's latest record for ``ref``'s tag names."""
        for artifact in await self.host.artifacts(ref.package_id):
            if artifact.artifact_id == ref.package_id:
                return artifact.digest
        return None

    async def in_log(self, ref: ImageRef, digest: Digest) -> bool:
        return bool(await self._artifacts(ref, digest))

    async def tags(self, short_name: str) -> list[str]:
        # Builds of this repository still running are committed first, so that a client
        # that was answered early sees its tag.
        for sep in (":", "@"):
            await self.host.settle(short_name + sep, limit=600.0)
        prefix = short_name + ":"
        return sorted({pid[len(prefix):] for pid in await self.host.package_ids(prefix)})

    # -- manifests -------------------------------------------------------------------

    async def resolve_manifest(self, ref: ImageRef) -> ResolvedManifest:
        """Find a manifest through the log; build it from the upstream on a miss."""
        source = "cache"
        digest = ref.digest or await self.tag_digest(ref)
        pending = await self.builder.settled(self.host, (ref.short_name, digest)) if (
            digest) else None
        if pending is not None:
            # A manifest of an image being built (e.g. a platform manifest of an index).
            await pending.event.wait()
            source = "build"
        elif digest is None or not await self.in_log(ref, digest):
            if self.host.is_build_node:
                self.builder.check_missing(ref)
            info, ready = await self._build_until_ready(ref)
            if not self.host.is_build_node:
                # A regular node does not build: it asked a build node and answers at once.
                detail = (f"build {info.build_id} requested from a build node"
                          if info.status == "REQUESTED" else info.reason)
                raise NotInLog(f"{ref.package_id} is not in the transparency log yet; {detail}")
            if ready is not None and ready.digest is not None:
                digest = ready.digest
            elif info is not None and info.status in ("FAILED", "NOT_FOUND"):
                message = f"build of {ref.package_id} failed: {info.reason}"
                error_type = ready.error_type if ready is not None else None
                if error_type is not None and issubclass(error_type, QuotaExceeded):
                    raise QuotaExceeded(message)
                raise ImageBuildError(message)
            else:
                digest = ref.digest or await self.tag_digest(ref)
            source = "build"
            if digest is None:
                raise NotInLog(f"{ref.package_id} is not in the transparency log after its build")
        if digest is None:  # a pending manifest is named by its digest
            raise NotInLog(f"{ref.package_id} is not in the transparency log")
        content = await self.verified_bytes(ref, digest)
        manifest = Manifest.parse(content)
        if source == "cache" and not manifest.is_index:
            # The client asks for the image's blobs next: those the node lacks start
            # coming from peers now (one at a time, after what the client asks for).
            logged = [found[0] for d in manifest.children
                      if (found := await self._artifacts(ref, d.digest))]
            self.host.prefetch(logged)
        return ResolvedManifest(digest, content, manifest.media_type, source)

    async def _build_until_ready(self, ref: ImageRef) -> tuple[BuildInfo, _Ready | None]:
        """Ask the node for the build and wait until its manifests are verified (or it
        ended): the client is answered while the layers are still being fetched."""
        ready = self.builder.ready.get(ref.package_id)
        if ready is None:
            ready = self.builder.ready[ref.package_id] = _Ready()
        outcome: list[BuildInfo | Exception] = []

        async def run() -> None:
            try:
                outcome.append(await self.host.build(ref.package_id))
            except Exception as exc:
                outcome.append(exc)
            ready.event.set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                await ready.event.wait()
                if ready.digest is not None:
                    tg.cancel_scope.cancel()  # the build goes on in the node
                # else the build failed before its manifests were ready: its outcome says
                # why, and arrives as soon as the node has recorded it.
        finally:
            if self.builder.ready.get(ref.package_id) is ready and outcome:
                del self.builder.ready[ref.package_id]
        if outcome and isinstance(outcome[0], Exception):
            raise outcome[0]
        if outcome:
            result = outcome[0]
            assert isinstance(result, BuildInfo)
            return result, ready
        return BuildInfo("", ref.package_id, "RUNNING"), ready

    async def verified_bytes(self, ref: ImageRef, digest: Digest) -> bytes:
        """A small artifact's bytes (manifest, config), fetched if missing, re-hashed."""
        blob = await self.ensure_blob(ref, digest)
        data = await blob.read(MAX_MANIFEST_BYTES)
        origin = blob.origin() if blob.origin is not None else None
        if origin:  # it was in flight (from a peer): its source, now that it is read
            provenance.note(origin, len(data))
        if Digest.of(data) != digest:
            # The store itself is corrupt: the host drops the copy; it is never served.
            await self.host.report_mismatch(digest)
            raise DigestMismatch(str(digest), str(Digest.of(data)))
        return data

    # -- referrers -------------------------------------------------------------------

    async def referrers(self, ref: ImageRef, subject: Digest) -> list[Referrer]:
        """The logged referrers of manifest ``subject`` of ``ref``'s repository.

        Referrers are logged as artifacts of the image whose manifest they refer to: the
        manifests reachable from each such package's own manifests are its image; of the
        others, the manifests whose ``subject`` is ``subject`` (and that are not a
        referrer's config or layer) are its referrers. None for a digest not in the log.
        """
        packages = {a.package_id for a in await self._artifacts(ref, subject)}
        found: dict[Digest, Referrer] = {}
        for package_id in sorted(packages):
            for referrer in await self.package_referrers(ref, package_id):
                if referrer.subject == subject:
                    found[referrer.digest] = referrer
        return [found[d] for d in sorted(found, key=str)]

    async def package_referrers(self, ref: ImageRef, package_id: str) -> list[Referrer]:
        """The referrers logged with package ``package_id`` (of ``ref``'s repository):
        its logged manifests, outside the image itself, that have a ``subject`` and are
        not another referrer's config or layer."""
        await self.host.settle(package_id, limit=60.0)
        logged = [a for a in await self.host.artifacts(package_id)
                  if a.artifact_id.partition("@")[0] == ref.short_name]
        digests = list(dict.fromkeys(a.digest for a in logged))
        image = await self._image_digests(ref, package_id, digests)
        children: set[Digest] = set()
        candidates: dict[Digest, Referrer] = {}
        for digest in digests:
            if digest in image:
                continue
            content = await self._small_bytes(ref, digest)
            if content is None:
                continue
            referrer = referrer_of(content, digest)
            try:
                children.update(d.digest for d in Manifest.parse(content).children)
            except ManifestError:
                continue  # a referrer's layer (an SBOM document, a signature...)
            if referrer is not None:
                candidates[digest] = referrer
        return [r for d, r in candidates.items() if d not in children]

    async def _image_digests(self, ref: ImageRef, package_id: str,
                             digests: Sequence[Digest]) -> set[Digest]:
        """The digests of the image itself (its manifests, configs and layers) among a
        package's logged ``digests``: those reachable from the package's own manifest."""
        logged = await self.host.artifacts(package_id)
        top = next((a.digest for a in logged if a.artifact_id == package_id), None)
        if top is None:
            _, _, text = package_id.partition("@")
            top = Digest.parse(text) if text else None
        image: set[Digest] = set()
        todo = [top] if top is not None else []
        while todo:
            digest = todo.pop()
            if digest in image:
                continue
            image.add(digest)
            content = await self._small_bytes(ref, digest)
            if content is None:
                continue
            try:
                manifest = Manifest.parse(content)
            except ManifestError:
                continue
            for d in manifest.manifests:
                todo.append(d.digest)
            image.update(d.digest for d in ((manifest.config,) if manifest.config else ())
                         + manifest.layers)
        return image

    async def _small_bytes(self, ref: ImageRef, digest: Digest) -> bytes | None:
        """A logged artifact's verified bytes if it may be a manifest (at most
        :data:`MAX_MANIFEST_BYTES`), else ``None``; small ones are cached by digest."""
        cached = self.builder.small.get(digest)
        if cached is not None:
            return cached
        blob = await self.ensure_blob(ref, digest)
        if blob.size > MAX_MANIFEST_BYTES:
            return None
        data = await self.verified_bytes(ref, digest)
        if len(data) > SMALL_CACHE_ENTRY:
            return data
        if len(self.builder.small) >= SMALL_CACHE_SIZE:
            del self.builder.small[next(iter(self.builder.small))]
        self.builder.small[digest] = data
        return data

    # -- blobs -----------------------------------------------------------------------

    async def ensure_blob(self, ref: ImageRef, digest: Digest) -> VerifiedBlob:
        """A logged artifact's verified copy (from the store, a peer or the upstream).

        An artifact of a build in progress is served once that build verified it.
        """
        pending = await self.builder.settled(self.host, (ref.short_name, digest))
        if pending is not None:
            # Served while it arrives (its end once verified), or once stored; asked
            # for, its fetch goes before the image's other blobs.
            if not pending.asked:
                pending.asked = True
                if pending.demand is not None:
                    pending.demand.changed()
            await pending.moved.wait()
            if pending.blob is not None:
                return pending.blob
            await pending.event.wait()
            if pending.stored:
                blob = await pending.sink.open(digest)
                if blob is not None:
                    return blob
            # Its build failed: once the node has ended it, only the log decides.
            await self.host.settle(pending.package_id, limit=60.0)
        artifacts = await self._artifacts(ref, digest)
        if not artifacts:
            log.info("Refused %s of %s: not in the transparency log", digest, ref.short_name)
            raise NotInLog(f"{digest} of {ref.short_name} is not in the transparency log")
        try:
            return await self.host.open_artifact(artifacts[0])
        except ArtifactUnavailable as exc:
            raise ImageBuildError(f"{digest} could not be fetched: {exc}") from None


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _close(body: Any) -> None:
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        await aclose()
