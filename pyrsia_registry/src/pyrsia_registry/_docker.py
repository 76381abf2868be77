"""Docker images on a node: resolve tags through the log, build on a miss, verify blobs.

Every manifest and blob the node serves is vouched for by a log record: a tag
resolves to the manifest digest its latest record names, and a blob is served
only if a record of that repository names its digest. Stored bytes were
verified when stored; manifests are re-hashed before each response.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import anyio
import attrs
from pyrsia_core.errors import DigestMismatch, PyrsiaError, QuotaExceeded
from pyrsia_core.interfaces import BlobInfo
from pyrsia_pkg_docker import (
    ALL_MANIFEST_TYPES,
    Descriptor,
    ImageRef,
    Manifest,
    ManifestError,
    reference_text,
)
from pyrsia_pkg_docker._upstream import UpstreamError, UpstreamNotFound

from pyrsia_core import Block, Digest, Operation, Record, StoredRecord

from ._node import Build, BuildError, Node, NotInLog

__all__ = ["DockerService", "ResolvedManifest"]

log = logging.getLogger("pyrsia.docker")
RECORD_TYPE = "Docker"
MAX_PARALLEL_BLOBS = 4
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


@attrs.frozen
class ResolvedManifest:
    digest: Digest
    content: bytes
    media_type: str
    source: str  # "cache", "build"


@attrs.define(eq=False)
class _Pending:
    """An artifact of a build in progress: verified and stored once ``event`` is set."""

    repository: str
    build: Build
    event: anyio.Event = attrs.Factory(anyio.Event)
    stored: bool = False


@attrs.define(eq=False)
class DockerService:
    """Docker images on a node.

    While a build runs, each artifact becomes servable as soon as it is fetched and
    verified against the manifest that names it (the manifests first), so a client
    pulling the image downloads while the node builds. Once the build ends only the
    log decides: a failed build's blobs are deleted and never served again.
    """

    node: Node
    task_group: anyio.abc.TaskGroup | None = None
    #: Artifacts of builds in progress, by (repository, digest): two builds of different
    #: repositories may share a digest, and each serves it to its own clients.
    _pending: dict[tuple[str, Digest], _Pending] = attrs.Factory(dict)
    #: Images the upstream does not have: package id -> (until when, the upstream's answer).
    _missing: dict[str, tuple[float, str]] = attrs.Factory(dict)
    #: Builds this (regular) node asked a build node for: build id -> that node's address.
    forwarded: dict[str, str] = attrs.Factory(dict)

    # -- log lookups ---------------------------------------------------------------

    async def _artifact_records(self, ref: ImageRef, digest: Digest) -> list[StoredRecord]:
        out = []
        for rec in await self.node.records_for_artifact(digest):
            r = rec.signed.record
            if r.package_type != RECORD_TYPE or r.operation != Operation.ADD_ARTIFACT:
                continue
            if r.package_specific_artifact_id.partition("@")[0] == ref.short_name or (
                r.package_specific_id.partition(":")[0].partition("@")[0] == ref.short_name
            ):
                out.append(rec)
        return out

    async def tag_digest(self, ref: ImageRef) -> Digest | None:
        """The manifest digest the log's latest record for ``ref``'s tag names."""
        records = await self.node.records_for_package(RECORD_TYPE, ref.package_id)
        for rec in reversed(records):
            r = rec.signed.record
            if r.package_specific_artifact_id == ref.package_id:
                return Digest(r.artifact_hash)
        return None

    async def in_log(self, ref: ImageRef, digest: Digest) -> bool:
        return bool(await self._artifact_records(ref, digest))

    async def settle(self, package_id: str | None = None, *, limit: float = 5.0) -> None:
        """Wait (bounded) for running builds -- of ``package_id``, or all -- to commit.

        A client is answered while its image is still being built; what it asks next
        (the log, the status) then reflects that build.
        """
        with anyio.move_on_after(limit):
            for (package_type, pid), running in list(self.node.inflight.items()):
                if package_type == RECORD_TYPE and package_id in (None, pid):
                    await running.done.wait()

    async def tags(self, short_name: str) -> list[str]:
        # Builds of this repository still running are committed first, so that a client
        # that was answered early sees its tag.
        for (package_type, package_id), running in list(self.node.inflight.items()):
            if package_type == RECORD_TYPE and package_id.startswith((f"{short_name}:",
                                                                       f"{short_name}@")):
                await running.done.wait()
        prefix = b"p/" + RECORD_TYPE.encode() + b"\0" + short_name.encode() + b":"
        tags: set[str] = set()
        async for key, _ in self.node.kv.scan(prefix):
            tags.add(key[len(prefix) :].split(b"\0", 1)[0].decode())
        return sorted(tags)

    # -- manifests -------------------------------------------------------------------

    async def resolve_manifest(self, ref: ImageRef, *, build: bool = True) -> ResolvedManifest:
        """Find a manifest through the log; build it from the upstream on a miss."""
        source = "cache"
        digest = ref.digest or await self.tag_digest(ref)
        pending = self._pending.get((ref.repository, digest)) if digest is not None else None
        if pending is not None and digest is not None:
            # A manifest of an image being built (e.g. a platform manifest of an index).
            await pending.event.wait()
            source = "build"
        elif digest is None or not await self.in_log(ref, digest):
            if not build:
                raise NotInLog(f"{ref.package_id} is not in the transparency log")
            if not self.node.is_build_node:
                # A regular node does not build: it asks a build node and answers at once.
                try:
                    status = await self.forward_build(ref)
                    detail = f"build {status.get('build_id', '')} requested from a build node"
                except PyrsiaError as exc:
                    detail = f"no build could be requested: {exc}"
                raise NotInLog(f"{ref.package_id} is not in the transparency log yet; {detail}")
            self.check_missing(ref)
            running = self.request_build(ref)
            await running.ready.wait()
            if running.status == "FAILED":
                message = f"build of {ref.package_id} failed: {running.reason}"
                if running.error_type is not None and issubclass(running.error_type,
                                                                 QuotaExceeded):
                    raise QuotaExceeded(message)
                raise BuildError(message)
            source = "build"
            digest = running.result if isinstance(running.result, Digest) else None
            digest = digest or ref.digest or await self.tag_digest(ref)
            if digest is None:
                raise NotInLog(f"{ref.package_id} is not in the transparency log after its build")
        content = await self.verified_bytes(ref, digest)
        manifest = Manifest.parse(content)
        return ResolvedManifest(digest, content, manifest.media_type, source)

    def check_missing(self, ref: ImageRef) -> None:
        """Raise at once for an image the upstream said it does not have, a moment ago."""
        entry = self._missing.get(ref.package_id)
        if entry is None:
            return
        if entry[0] > time.monotonic():
            raise BuildError(f"{ref.package_id} not found upstream: {entry[1]} (remembered "
                             f"for {NEGATIVE_TTL:.0f} s)")
        del self._missing[ref.package_id]

    def _remember_missing(self, ref: ImageRef, answer: str) -> None:
        now = time.monotonic()
        if len(self._missing) >= NEGATIVE_CACHE_SIZE:
            for key in [k for k, (until, _) in self._missing.items() if until <= now]:
                del self._missing[key]
            while len(self._missing) >= NEGATIVE_CACHE_SIZE:
                del self._missing[next(iter(self._missing))]
        self._missing[ref.package_id] = (now + NEGATIVE_TTL, answer)

    async def verified_bytes(self, ref: ImageRef, digest: Digest) -> bytes:
        """A small artifact's bytes (manifest, config), fetched if missing, re-hashed."""
        info = await self.ensure_blob(ref, digest)
        data = await self.node.blobs.read_bytes(info.digest)
        if Digest.of(data) != digest:
            # The store itself is corrupt: drop the blob, never serve it.
            await self.node.quarantine(digest, "a stored manifest failed its re-hash")
            raise DigestMismatch(str(digest), str(Digest.of(data)))
        return data

    # -- blobs -----------------------------------------------------------------------

    async def ensure_blob(self, ref: ImageRef, digest: Digest) -> BlobInfo:
        """A logged artifact's local copy, fetched (and verified) when missing.

        An artifact of a build in progress is served once that build verified it. A
        stored copy is checked before it is served (its size always; its hash the first
        time in this run): a damaged one is quarantined and fetched again.
        """
        pending = self._pending.get((ref.repository, digest))
        if pending is not None:
            await pending.event.wait()
            info = await self.node.verified_blob(digest)
            if pending.stored and info is not None:
                return info
        if not await self.in_log(ref, digest):
            log.info("Refused %s of %s: not in the transparency log", digest, ref.repository)
            raise NotInLog(f"{digest} of {ref.repository} is not in the transparency log")
        info = await self.node.verified_blob(digest)
        if info is not None:
            await self.node.touch(digest)
            return info
        async with self.node.fetch_lock(digest):
            info = await self.node.verified_blob(digest)
            if info is not None:
                return info
            peers = self.node.peers
            if peers is not None and len(peers.table):
                try:
                    fetched: BlobInfo = await peers.fetch(digest)
                    return fetched
                except PyrsiaError as exc:
                    if self.node.upstream is None or not self.node.is_build_node:
                        raise BuildError(
                            f"{digest} could not be fetched from peers: {exc}"
                        ) from None
                    log.warning("Peers could not provide %s (%s); trying the upstream", digest,
                                exc)
            if not self.node.is_build_node and self.node.upstream is None:
                raise BuildError(f"{digest} is not stored here and no peer provides it")
            return await self._fetch_from_upstream(ref, digest, None, "re-fetch")

    async def _fetch_from_upstream(
        self, ref: ImageRef, digest: Digest, size: int | None, why: str
    ) -> BlobInfo:
        """Fetch one artifact by digest from the upstream, verify it and store it.

        An evicted manifest is fetched again through the manifests endpoint (registries
        serve manifests there, not as blobs); either way the digest is checked.
        """
        upstream = self.node.upstream
        if upstream is None:
            raise BuildError(f"{digest} is not stored locally and this node has no upstream")
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
                info = await self.node.store_stream(resp.body, digest, size)
            finally:
                await resp.body.aclose()  # type: ignore[attr-defined]
        except UpstreamNotFound as exc:
            raise BuildError(f"{digest} not found upstream: {exc}") from None
        except UpstreamError as exc:
            raise BuildError(f"upstream failed: {exc}") from None
        log.info(
            "Blob %s of %s pulled from upstream (%s, %d bytes)",
            digest,
            ref.repository,
            why,
            info.size,
        )
        return info

    # -- builds ----------------------------------------------------------------------

    async def build_and_wait(self, ref: ImageRef) -> Build:
        build = self.request_build(ref)
        await build.done.wait()
        if build.status != "SUCCESS":
            raise BuildError(f"build of {ref.package_id} failed: {build.reason}")
        return build

    def request_build(self, ref: ImageRef) -> Build:
        if self.task_group is None:
            raise BuildError("the node is not running")

        async def run(build: Build) -> int:
            return await self._build(ref, build)

        return self.node.start_build(RECORD_TYPE, ref.package_id, run, self.task_group)

    async def _fetch_manifest(
        self, ref: ImageRef, reference: str, budget: list[int] | None = None
    ) -> tuple[Digest, bytes, str]:
        """One manifest from the upstream, at most :data:`MAX_MANIFEST_BYTES` and, with
        ``budget`` (``[bytes left]`` for the build's manifests), within that budget."""
        upstream = self.node.upstream
        if upstream is None:
            raise BuildError("this node has no upstream to build from")
        log.info("Fetching manifest for %s from upstream",
                 reference_text(ref.repository, reference))
        resp = await upstream.open(
            f"{ref.repository}/manifests/{reference}", accept=ALL_MANIFEST_TYPES
        )
        limit = MAX_MANIFEST_BYTES if budget is None else min(MAX_MANIFEST_BYTES, budget[0])
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
            await resp.body.aclose()  # type: ignore[attr-defined]
        if budget is not None:
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
    def _too_large(ref: ImageRef, reference: str, budget: list[int] | None) -> BuildError:
        if budget is not None and budget[0] < MAX_MANIFEST_BYTES:
            return BuildError(
                f"the manifests of {ref.package_id} are too large: over "
                f"{MAX_BUILD_MANIFEST_BYTES} bytes in all (at {ref.repository}@{reference})")
        return BuildError(f"upstream manifest {ref.repository}:{reference} is too large "
                          f"(over {MAX_MANIFEST_BYTES} bytes)")

    async def _build(self, ref: ImageRef, build: Build) -> int:
        """Fetch the image from upstream, verify and store everything, commit its records.

        On any failure the blobs this build stored are removed again: nothing of a
        failed build stays behind, and the log is unchanged.
        """
        created: list[Digest] = []
        mine: list[tuple[str, Digest]] = []
        try:
            return await self._build_inner(ref, build, created, mine)
        except BaseException:
            with anyio.CancelScope(shield=True):
                for digest in created:
                    await self.node.blobs.delete(digest)
            raise
        finally:
            for key in mine:
                pending = self._pending.pop(key, None)
                if pending is not None:
                    pending.event.set()

    def _expect(self, ref: ImageRef, build: Build, digest: Digest,
                mine: list[tuple[str, Digest]]) -> None:
        key = (ref.repository, digest)
        if key not in self._pending:
            self._pending[key] = _Pending(ref.repository, build)
            mine.append(key)

    def _release(self, ref: ImageRef, digest: Digest) -> None:
        pending = self._pending.get((ref.repository, digest))
        if pending is not None:
            pending.stored = True
            pending.event.set()

    async def _fetch_image(
        self, ref: ImageRef, build: Build | None, created: list[Digest],
        mine: list[tuple[str, Digest]],
    ) -> list[tuple[str, Digest]]:
        """Fetch, verify and store an image from the upstream; its (artifact id, digest) list.

        With ``build``, each artifact is released to waiting clients once verified. Each
        manifest is stored as soon as it is verified (only its descriptors are kept), the
        manifests' total size and number and the image's artifacts are bounded, and the
        image must fit in the disk quota before any client is told it exists.
        """
        try:
            budget = [MAX_BUILD_MANIFEST_BYTES]
            top_digest, top, media_type = await self._fetch_manifest(ref, ref.reference, budget)
            manifest = Manifest.parse(top, media_type)
            artifacts: list[tuple[str, Digest]] = []  # (package_specific_artifact_id, digest)
            if ref.tag is not None:
                artifacts.append((ref.package_id, top_digest))
            artifacts.append((ref.artifact_id(top_digest), top_digest))
            unique: dict[Digest, Descriptor] = {}
            manifest_bytes = len(top)

            def add_children(children: Sequence[Descriptor]) -> None:
                for d in children:
                    unique.setdefault(d.digest, d)
                    if len(unique) + len(artifacts) > MAX_IMAGE_ARTIFACTS:
                        raise BuildError(
                            f"{ref.package_id} has too many artifacts: over "
                            f"{MAX_IMAGE_ARTIFACTS} manifests, configs and layers")

            subs = list(manifest.manifests) if manifest.is_index else []
            if len(subs) > MAX_INDEX_MANIFESTS:
                raise BuildError(f"the index of {ref.package_id} names {len(subs)} manifests, "
                                 f"over the limit of {MAX_INDEX_MANIFESTS}")
            if build is not None:
                self._expect(ref, build, top_digest, mine)
                for d in subs:
                    self._expect(ref, build, d.digest, mine)
            await self._store_manifest(ref, top_digest, top, created)
            del top
            if not manifest.is_index:
                add_children(manifest.children)
            for d in subs:
                sub_digest, sub, sub_type = await self._fetch_manifest(ref, str(d.digest),
                                                                       budget)
                if sub_digest != d.digest:
                    raise DigestMismatch(str(d.digest), str(sub_digest))
                sub_manifest = Manifest.parse(sub, sub_type)
                if sub_manifest.is_index:
                    raise ManifestError("nested indexes are not supported")
                if (ref.artifact_id(sub_digest), sub_digest) not in artifacts:
                    artifacts.append((ref.artifact_id(sub_digest), sub_digest))
                add_children(sub_manifest.children)
                manifest_bytes += len(sub)
                await self._store_manifest(ref, sub_digest, sub, created)
                del sub, sub_manifest
            del manifest
            self._check_fits(ref, manifest_bytes, unique.values())
            for d in unique.values():
                artifacts.append((ref.artifact_id(d.digest), d.digest))
            if build is not None:
                for _, digest in artifacts:
                    self._expect(ref, build, digest, mine)
                build.result = top_digest
                build.ready.set()
            await self._fetch_blobs(ref, list(unique.values()), created)
        except UpstreamNotFound as exc:
            if build is not None:
                self._remember_missing(ref, str(exc))
            raise BuildError(f"{ref.package_id} not found upstream: {exc}") from None
        except UpstreamError as exc:
            raise BuildError(f"upstream failed: {exc}") from None
        except (ManifestError, DigestMismatch) as exc:
            raise BuildError(f"upstream sent bad content: {exc}") from None
        return artifacts

    async def _store_manifest(self, ref: ImageRef, digest: Digest, content: bytes,
                              created: list[Digest]) -> None:
        if await self.node.local_blob(digest) is None:
            await self.node.put_bytes(content, digest)
            created.append(digest)
        self._release(ref, digest)

    def _check_fits(self, ref: ImageRef, manifest_bytes: int,
                    blobs: Sequence[Descriptor] | Any) -> None:
        """Refuse, before a client is told the image exists, one larger than the quota."""
        quota = self.node.blobs.quota
        if quota is None:
            return
        total = manifest_bytes + sum(max(0, d.size) for d in blobs)
        if total > quota:
            raise QuotaExceeded(
                f"{ref.package_id} needs {total} bytes, more than this node's disk quota of "
                f"{quota} bytes (pyrsia node start --disk-space)")

    async def _build_inner(
        self, ref: ImageRef, build: Build, created: list[Digest],
        mine: list[tuple[str, Digest]],
    ) -> int:
        artifacts = await self._fetch_image(ref, build, created, mine)
        now = int(self.node.clock.now())
        records = [
            Record.new(
                signer=self.node.signer,
                package_type=RECORD_TYPE,
                package_specific_id=ref.package_id,
                package_specific_artifact_id=artifact_id,
                artifact_hash=digest.hex,
                num_artifacts=len(artifacts),
                timestamp=now,
            )
            for artifact_id, digest in artifacts
        ]
        # Large blobs also get a logged part list, so nodes fetching them at once can
        # share verified parts (swarm fetch); it rides in the same block.
        part_records = await self.node.part_list_records([d for _, d in artifacts], now)
        committed = await self.node.commit(records + part_records)
        build.records = len(records)
        if self.node.peers is not None and self.task_group is not None:
            self.task_group.start_soon(
                self.node.peers.announce,
                list(dict.fromkeys(d for _, d in artifacts))
                + [Digest.parse("sha256:" + r.artifact_hash) for r in part_records],
            )
        log.info(
            "Built %s: %d artifacts, block %d", ref.package_id, len(records), committed.block.height
        )
        return committed.block.height

    async def _fetch_blobs(
        self, ref: ImageRef, descriptors: Sequence[Descriptor], created: list[Digest]
    ) -> None:
        limiter = anyio.Semaphore(MAX_PARALLEL_BLOBS)
        errors: list[BaseException] = []

        async def one(d: Descriptor) -> None:
            async with limiter:
                # Builds step aside while the build nodes decide a height.
                await self.node.priority.wait()
                try:
                    async with self.node.fetch_lock(d.digest):
                        if await self.node.verified_blob(d.digest) is not None:
                            log.info("Blob %s already in the local cache", d.digest)
                            self._release(ref, d.digest)
                            return
                        await self._fetch_from_upstream(ref, d.digest, d.size, "build")
                        created.append(d.digest)
                        self._release(ref, d.digest)
                except PyrsiaError as exc:
                    errors.append(exc)

        async with anyio.create_task_group() as tg:
            for d in descriptors:
                tg.start_soon(one, d)
        if errors:
            raise errors[0]


    async def rebuild_check(self, block: Block) -> bool:
        """Did this node, building every image of ``block`` itself, get the same hashes?

        For each Docker package in the block: fetch it from this node's own upstream
        (verifying and storing it, so this node can serve it too) and compare the set of
        (artifact id, hash) with the block's records. Other records pass.
        """
        packages: dict[str, set[tuple[str, str]]] = {}
        for sr in block.records:
            r = sr.record
            if r.package_type == RECORD_TYPE and r.operation == Operation.ADD_ARTIFACT:
                packages.setdefault(r.package_specific_id, set()).add(
                    (r.package_specific_artifact_id, r.artifact_hash)
                )
        for package_id, claimed in packages.items():
            try:
                ref = ImageRef.parse(package_id)
            except ValueError:
                return False
            created: list[Digest] = []
            try:
                built = await self._fetch_image(ref, None, created, [])
            except PyrsiaError as exc:
                log.warning("Could not rebuild %s to check a proposal: %s", package_id, exc)
                return False
            mine = {(aid, d.hex) for aid, d in built}
            if mine != claimed:
                log.warning("Proposal claims hashes for %s that differ from this node's build",
                            package_id)
                return False
        return True

    # -- build requests between nodes ------------------------------------------------

    async def handle_build_request(self, body: Any) -> dict[str, Any]:
        """A peer asks this build node to build an image (``BUILD_REQUEST``)."""
        if not isinstance(body, dict) or body.get("package_type", "docker") != "docker":
            raise ValueError("BUILD_REQUEST needs package_type docker and an image")
        ref = ImageRef.parse(str(body.get("image", "")))
        if not self.node.is_build_node:
            raise BuildError("this node is not a build node")
        if await self.tag_digest(ref) is not None or (
            ref.digest is not None and await self.in_log(ref, ref.digest)
        ):
            return {"status": "EXISTS", "package_specific_id": ref.package_id,
                    "reason": "Artifact already exists"}
        return self.request_build(ref).to_json()

    async def forward_build(self, ref: ImageRef) -> dict[str, Any]:
        """On a regular node: send the build request to an authorized build node."""
        if self.node.peers is None:
            raise BuildError("no build node could be reached: none known")
        try:
            status, address = await self.node.peers.request_build(
                {"package_type": "docker", "image": ref.package_id})
        except PyrsiaError as exc:
            raise BuildError(str(exc)) from None
        if "build_id" in status:
            self.forwarded[str(status["build_id"])] = address
        log.info("Sent a build request for %s to build node %s", ref.package_id,
                 status["build_node"][:16])
        return dict(status)

    async def forwarded_status(self, build_id: str) -> dict[str, Any] | None:
        address = self.forwarded.get(build_id)
        peers = self.node.peers
        if address is None or peers is None:
            return None
        env = await peers.rpc(address, "GET_BUILD", {"build_id": build_id}, {"BUILD_STATUS"})
        return dict(env.body)
