"""Package-type plugins on a node: their routes, their builds, and their failures.

A :class:`~pyrsia_core.interfaces.PackageType` that sets ``mount_path`` gets a
:class:`PluginHost` (log lookups, verified artifact reads, builds through the same
commit/consensus path as Docker builds) and its ASGI app is mounted under that path,
behind a :class:`GuardedApp`: a plugin that raises, hangs or sends garbage fails that
request -- with an error naming the plugin, within ``timeout`` -- and nothing else.

Validators rebuild packages with :meth:`PackageService.rebuild_check`, dispatched by
each record's ``package_type``. The node knows no package type by name: Docker is a
plugin like Maven (its OCI app is mounted at ``/v2``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    MutableMapping,
    Sequence,
)
from typing import Any

import anyio
import anyio.abc
import attrs
from pyrsia_core.errors import (
    ArtifactUnavailable,
    BuildFailed,
    DigestMismatch,
    PluginFailed,
    PyrsiaError,
    TransferAborted,
)
from pyrsia_core.interfaces import (
    ArtifactSink,
    ASGIApp,
    BlobInfo,
    BuildInfo,
    BuiltArtifact,
    LoggedArtifact,
    PackageHost,
    PackageType,
    Upstream,
    VerifiedBlob,
)

from pyrsia_core import NODE_PACKAGE_TYPE, Block, Digest, Operation, Record, provenance
from pyrsia_core import plugins as core_plugins

from ._node import Build, Node
from ._receiving import Receiving

__all__ = ["GuardedApp", "PackageService", "PluginHost"]

log = logging.getLogger("pyrsia.packages")
RESERVED_PATHS = ("/api", "/p2p")
#: Prefetches (each an image's blobs, one at a time) a node runs at once; more are dropped.
MAX_PREFETCHES = 4
#: Artifacts one prefetch takes at most.
MAX_IMAGE_PREFETCH = 1000
#: Seconds a prefetch waits before its first fetch, so that the blob a client asks for
#: next starts first.
PREFETCH_DELAY = 0.05


def plugin_label(name: str) -> str:
    """``maven (pyrsia-pkg-maven 0.1.0)``: how errors name a package-type plugin."""
    try:
        spec = core_plugins.available("pyrsia.package_type").get(name)
    except PyrsiaError:
        spec = None
    return f"{name} ({spec.dist})" if spec is not None else name


@attrs.define(eq=False)
class NodeSink(ArtifactSink):
    """A build's way into the node's blob store: verified, quota-aware, evicting only as
    bytes arrive (:meth:`Node.store_stream`). Remembers the blobs it added, so that a
    failed build leaves nothing behind (:meth:`discard`). Blobs stream to the plugin's
    clients while they arrive (``on_receiving``)."""

    node: Node
    created: list[Digest] = attrs.Factory(list)

    async def store(
        self,
        chunks: AsyncIterable[bytes],
        *,
        expected: Digest | None = None,
        size: int | None = None,
        on_receiving: Callable[[VerifiedBlob], None] | None = None,
    ) -> BlobInfo:
        # Builds step aside while the build nodes decide a height.
        await self.node.priority.wait()
        if expected is not None:
            if await self.node.verified_blob(expected) is not None:
                info = await self.node.blobs.stat(expected)
                if info is not None:
                    aclose = getattr(chunks, "aclose", None)
                    if aclose is not None:
                        await aclose()
                    return info

            def started(receiving: Receiving) -> None:
                if on_receiving is not None and receiving.size is not None:
                    on_receiving(receiving.blob())

            info = await self.node.store_stream(chunks, expected, size, on_receiving=started)
            self.created.append(info.digest)
            return info
        info = await self.node.store_stream(chunks, None, size)
        if not await self.node.records_for_artifact(info.digest):
            self.created.append(info.digest)  # a logged blob is never removed again
        return info

    async def store_bytes(self, data: bytes, expected: Digest) -> BlobInfo:
        async def one() -> AsyncIterator[bytes]:
            yield data

        return await self.store(one(), expected=expected, size=len(data))

    async def open(self, digest: Digest) -> VerifiedBlob | None:
        info = await self.node.verified_blob(digest)
        return _node_blob(self.node, info) if info is not None else None

    @property
    def quota(self) -> int | None:
        return self.node.blobs.quota

    def keep(self, *digests: Digest) -> None:
        """These blobs are logged (or vouched for): :meth:`discard` leaves them."""
        keep = set(digests)
        self.created = [d for d in self.created if d not in keep]

    async def discard(self) -> None:
        """Remove the blobs this sink added and were not kept."""
        with anyio.CancelScope(shield=True):
            for digest in dict.fromkeys(self.created):
                await self.node.blobs.delete(digest)
        self.created.clear()


def _node_blob(node: Node, info: BlobInfo) -> VerifiedBlob:
    digest = info.digest

    def reader(offset: int, length: int | None) -> AsyncIterator[bytes]:
        return node.blobs.open(digest, offset=offset, length=length)

    return VerifiedBlob(digest, info.size, reader, info.path)


@attrs.define(eq=False)
class _PeerFetch:
    """One fetch of a blob from peers, shared by every request for it."""

    receiving: Receiving | None = None
    done: bool = False
    #: Where the bytes came from (``"pulled from peer <node id>"``), once done.
    source: str | None = None
    _event: anyio.Event = attrs.Factory(anyio.Event)

    def changed(self) -> None:
        event, self._event = self._event, anyio.Event()
        event.set()

    async def wait(self) -> None:
        await self._event.wait()


@attrs.define(eq=False)
class PluginHost(PackageHost):
    """The node as one package-type plugin sees it (bound to its record type)."""

    service: PackageService
    package_type: PackageType

    @property
    def node(self) -> Node:
        return self.service.node

    @property
    def node_id(self) -> str:
        return self.node.node_id

    @property
    def is_build_node(self) -> bool:
        return self.node.is_build_node

    @property
    def upstream(self) -> Upstream | None:
        return self.node.upstream

    async def settle(self, prefix: str, *, limit: float = 5.0) -> None:
        record_type = self.package_type.record_type
        with anyio.move_on_after(limit):
            for (package_type, package_id), running in list(self.node.inflight.items()):
                if package_type == record_type and package_id.startswith(prefix):
                    await running.done.wait()

    async def artifacts(self, package_id: str) -> list[LoggedArtifact]:
        latest: dict[str, LoggedArtifact] = {}
        for rec in await self.node.records_for_package(self.package_type.record_type,
                                                        package_id):
            r = rec.signed.record
            if r.operation != Operation.ADD_ARTIFACT:
                continue
            latest[r.package_specific_artifact_id] = LoggedArtifact(
                r.package_specific_id, r.package_specific_artifact_id, Digest(r.artifact_hash),
                r.timestamp, r.num_artifacts)
        return list(latest.values())

    async def package_ids(self, prefix: str) -> list[str]:
        key = b"p/" + self.package_type.record_type.encode() + b"\0" + prefix.encode()
        out: set[str] = set()
        async for k, _ in self.node.kv.scan(key):
            out.add(k[len(key) - len(prefix.encode()):].split(b"\0", 1)[0].decode())
        return sorted(out)

    async def artifacts_with_digest(self, digest: Digest) -> list[LoggedArtifact]:
        out: list[LoggedArtifact] = []
        for rec in await self.node.records_for_artifact(digest):
            r = rec.signed.record
            if (r.package_type == self.package_type.record_type
                    and r.operation == Operation.ADD_ARTIFACT):
                out.append(LoggedArtifact(r.package_specific_id, r.package_specific_artifact_id,
                                          Digest(r.artifact_hash), r.timestamp,
                                          r.num_artifacts))
        return out

    async def _vouched(self, artifact: LoggedArtifact) -> bool:
        for rec in await self.node.records_for_artifact(artifact.digest):
            r = rec.signed.record
            if (r.package_type == self.package_type.record_type
                    and r.operation == Operation.ADD_ARTIFACT
                    and r.package_specific_id == artifact.package_id
                    and r.package_specific_artifact_id == artifact.artifact_id):
                return True
        return False

    async def _local(self, digest: Digest) -> VerifiedBlob | None:
        info = await self.node.verified_blob(digest)
        if info is None:
            return None
        await self.node.touch(digest)
        return _node_blob(self.node, info)

    async def open_artifact(self, artifact: LoggedArtifact) -> VerifiedBlob:
        if not isinstance(artifact, LoggedArtifact) or not await self._vouched(artifact):
            raise ArtifactUnavailable(f"{getattr(artifact, 'artifact_id', artifact)!r:.200} is "
                                      "not in the transparency log")
        digest = artifact.digest
        blob = await self._local(digest)
        if blob is not None:
            return blob
        # Being received already (a peer fetch, a build): served as it arrives.
        receiving = self.node.receiving.get(digest.hex)
        if receiving is not None:
            try:
                await receiving.wait_size()
                return receiving.blob()
            except TransferAborted:
                pass
        peers = self.node.peers
        if peers is not None and len(peers.table):
            blob = await self._from_peers(artifact)
            if blob is not None:
                return blob
        async with self.node.fetch_lock(digest):
            blob = await self._local(digest)
            if blob is not None:
                return blob
            blob = await self._fetch_again(artifact)
            if blob is not None:
                return blob
            if not self.node.is_build_node:
                raise ArtifactUnavailable(f"{artifact.artifact_id} is not stored here and no "
                                          "peer provides it")
            # A build node fetches it again from the upstream: the bytes must still be
            # the ones the log vouches for.
            sink = NodeSink(self.node)
            try:
                built = await self.service.run_plugin_build(
                    self.package_type, artifact.package_id, [artifact.artifact_id], sink)
                for item in built:
                    if item.artifact_id == artifact.artifact_id and item.digest == digest:
                        if item.data is not None:
                            await sink.store_bytes(item.data, digest)
                        sink.keep(digest)
                        log.info("%s (%s) fetched again from the upstream",
                                 artifact.artifact_id, digest)
                        blob = await self._local(digest)
                        if blob is not None:
                            return blob
            finally:
                await sink.discard()
            log.error("The upstream now serves other bytes for %s than the log vouches for "
                      "(%s); not served", artifact.artifact_id, digest)
            raise ArtifactUnavailable(
                f"the upstream no longer provides {artifact.artifact_id} with the logged digest "
                f"{digest} (tampered or changed upstream); not served")

    def prefetch(self, artifacts: Sequence[LoggedArtifact]) -> None:
        service = self.service
        peers = self.node.peers
        if (service.task_group is None or peers is None or not len(peers.table)
                or service.prefetching >= MAX_PREFETCHES):
            return
        wanted = [a for a in artifacts if isinstance(a, LoggedArtifact)][:MAX_IMAGE_PREFETCH]
        if wanted:
            service.prefetching += 1
            service.task_group.start_soon(self._prefetch, wanted)

    async def _prefetch(self, artifacts: list[LoggedArtifact]) -> None:
        service = self.service
        try:
            await anyio.sleep(PREFETCH_DELAY)  # the client asks for its first blob first
            for artifact in artifacts:
                digest = artifact.digest
                if (await self.node.local_blob(digest) is not None
                        or digest.hex in self.node.receiving
                        or not await self._vouched(artifact)):
                    continue
                while service.peer_fetches:  # what clients ask for goes first
                    await next(iter(service.peer_fetches.values())).wait()
                if await self.node.local_blob(digest) is not None:
                    continue
                fetch = service.peer_fetches[digest.hex] = _PeerFetch()
                await self._peer_fetch(artifact, fetch)
        except Exception as exc:  # a background task: it never takes the node down
            log.warning("Prefetching from peers stopped: %s: %s", type(exc).__name__, exc)
        finally:
            service.prefetching -= 1

    async def _from_peers(self, artifact: LoggedArtifact) -> VerifiedBlob | None:
        """The blob from peers: one fetch per digest however many ask (it runs in the
        node's task group, so a client that goes away does not stop it for the others),
        served to each as it arrives; ``None`` if the peers could not provide it."""
        digest = artifact.digest
        fetch = self.service.peer_fetches.get(digest.hex)
        if fetch is None:
            fetch = self.service.peer_fetches[digest.hex] = _PeerFetch()
            if self.service.task_group is not None:
                self.service.task_group.start_soon(self._peer_fetch, artifact, fetch)
            else:
                await self._peer_fetch(artifact, fetch)
        while True:
            receiving = fetch.receiving
            if receiving is not None:
                try:
                    await receiving.wait_size()
                    return receiving.blob()
                except TransferAborted:
                    if fetch.receiving is receiving:
                        await fetch.wait()  # a retry (another provider) or the end
                    continue
            if fetch.done:
                blob = await self._local(digest)
                if blob is not None and fetch.source:
                    provenance.note(fetch.source, blob.size)  # this request waited for it
                return blob
            await fetch.wait()

    async def _peer_fetch(self, artifact: LoggedArtifact, fetch: _PeerFetch) -> None:
        digest = artifact.digest
        peers = self.node.peers

        def started(receiving: Receiving) -> None:
            fetch.receiving = receiving
            fetch.changed()

        try:
            async with self.node.fetch_lock(digest):
                if await self._local(digest) is None:
                    await peers.fetch(digest, on_receiving=started)
                    log.info("%s (%s) pulled from a peer", artifact.artifact_id, digest)
        except PyrsiaError as exc:
            log.warning("Peers could not provide %s: %s", artifact.artifact_id, exc)
        except Exception as exc:  # a background task: it never takes the node down
            log.error("Fetching %s from peers failed: %s: %s", artifact.artifact_id,
                      type(exc).__name__, exc)
        finally:
            if fetch.receiving is not None:
                fetch.source = fetch.receiving.source
            fetch.done = True
            fetch.receiving = None
            fetch.changed()
            if self.service.peer_fetches.get(digest.hex) is fetch:
                del self.service.peer_fetches[digest.hex]

    async def _fetch_again(self, artifact: LoggedArtifact) -> VerifiedBlob | None:
        """The plugin's own re-fetch of one artifact (a build node, or a node with an
        upstream), verified against the logged digest; ``None`` if it has none."""
        if not (self.node.is_build_node or self.node.upstream is not None):
            return None
        pt = self.package_type
        if type(pt).fetch_artifact is PackageType.fetch_artifact:
            return None
        sink = NodeSink(self.node)
        label = plugin_label(pt.name)
        try:
            with anyio.fail_after(_timeout(pt, "build_timeout", self.service.timeout)):
                fetched = await pt.fetch_artifact(artifact, sink)
            if fetched is True:
                blob = await self._local(artifact.digest)
                if blob is not None:
                    sink.keep(artifact.digest)
                    return blob
            return None
        except TimeoutError:
            log.warning("package type %s: re-fetching %s took too long", label,
                        artifact.artifact_id)
            return None
        except PyrsiaError as exc:
            raise ArtifactUnavailable(f"{artifact.artifact_id} could not be fetched again: "
                                      f"{exc}") from None
        except Exception as exc:
            raise ArtifactUnavailable(f"package type {label} failed to fetch "
                                      f"{artifact.artifact_id}: {type(exc).__name__}: {exc}"
                                      ) from None
        finally:
            await sink.discard()

    async def report_mismatch(self, digest: Digest) -> None:
        await self.node.quarantine(digest, "a served blob failed its re-hash")

    async def build(self, package_id: str, *, artifact_ids: Sequence[str] = ()) -> BuildInfo:
        return await self.service.build(self.package_type, package_id, artifact_ids)


@attrs.define(eq=False)
class PackageService:
    """The node's package-type plugins: mounts, builds, rebuild checks."""

    node: Node
    task_group: anyio.abc.TaskGroup | None = None
    #: Seconds a plugin may take to build, or to start (and continue) a response.
    timeout: float = 60.0
    hosts: dict[str, PluginHost] = attrs.Factory(dict)
    #: Builds this (regular) node asked a build node for: build id -> that node's address.
    forwarded: dict[str, str] = attrs.Factory(dict)
    #: Blobs being fetched from peers for clients (by digest hex): one fetch each.
    peer_fetches: dict[str, _PeerFetch] = attrs.Factory(dict)
    #: Background prefetches running (:meth:`PluginHost.prefetch`).
    prefetching: int = 0

    def __attrs_post_init__(self) -> None:
        for name, pt in self.node.package_types.items():
            if isinstance(pt, PackageType):
                self.hosts[name] = PluginHost(self, pt)

    def get(self, name: str) -> PackageType | None:
        host = self.hosts.get(name)
        return host.package_type if host is not None else None

    def by_record_type(self, record_type: str) -> PackageType | None:
        for host in self.hosts.values():
            if host.package_type.record_type == record_type:
                return host.package_type
        return None

    # -- routes --------------------------------------------------------------------------

    def mounts(self) -> dict[str, ASGIApp]:
        """``mount path -> guarded app`` for every plugin that serves routes."""
        out: dict[str, ASGIApp] = {}
        for name, host in self.hosts.items():
            label = plugin_label(name)
            try:
                path = host.package_type.mount_path
                if not path:
                    continue
                if (not isinstance(path, str) or not path.startswith("/") or path == "/"
                        or path.rstrip("/").startswith(RESERVED_PATHS) or path in out):
                    log.error("package type %s: mount path %r refused", label, path)
                    continue
                app = host.package_type.asgi_app(host)
                if app is None:
                    continue
            except Exception as exc:
                log.error("package type %s failed to create its app: %s", label, exc)
                app = _failed_app(f"it failed to start: {type(exc).__name__}: {exc}")
            out[path.rstrip("/")] = GuardedApp(
                app, label, _timeout(host.package_type, "response_timeout", self.timeout))
            log.info("Package type %s serves %s", label, path)
        return out

    # -- builds --------------------------------------------------------------------------

    async def run_plugin_build(
        self, pt: PackageType, package_id: str, artifact_ids: Sequence[str], sink: NodeSink
    ) -> list[BuiltArtifact]:
        """The plugin's checked build into ``sink``, bounded by the timeout; failures name
        the plugin. The artifacts that carry bytes are stored too."""
        label = plugin_label(pt.name)
        timeout = _timeout(pt, "build_timeout", self.timeout)
        try:
            with anyio.fail_after(timeout):
                built = await pt.build(package_id, artifact_ids=artifact_ids, sink=sink)
                for item in built:
                    if item.data is not None:
                        await sink.store_bytes(item.data, item.digest)
            return built
        except TimeoutError:
            raise PluginFailed(label, f"build of {package_id!r:.200} did not finish within "
                               f"{timeout:g} s") from None
        except PluginFailed as exc:
            raise PluginFailed(label, exc.reason) from None
        except PyrsiaError:
            raise
        except ValueError as exc:
            raise BuildFailed(f"invalid {pt.name} package id: {exc}") from None
        except Exception as exc:  # the rim maps most; parse_package_id may still raise
            raise PluginFailed(label, f"{type(exc).__name__}: {exc}") from None

    async def _logged(self, pt: PackageType, package_id: str) -> dict[str, str]:
        """``artifact id -> hash`` of a package's logged artifacts."""
        return {r.signed.record.package_specific_artifact_id: r.signed.record.artifact_hash
                for r in await self.node.records_for_package(pt.record_type, package_id)
                if r.signed.record.operation == Operation.ADD_ARTIFACT}

    async def build(
        self, pt: PackageType, package_id: str, artifact_ids: Sequence[str] = ()
    ) -> BuildInfo:
        """Build (or join the build of) ``package_id``; see :meth:`PackageHost.build`."""
        try:
            package_id = _parse(pt, package_id)
        except ValueError as exc:
            return BuildInfo("", str(package_id)[:200], "FAILED", f"invalid package id: {exc}")
        wanted = [a for a in artifact_ids if isinstance(a, str)][:100]
        logged = await self._logged(pt, package_id)
        if logged and all(a in logged for a in wanted):
            return BuildInfo("", package_id, "EXISTS", "Artifact already exists")
        if not self.node.is_build_node:
            try:
                status = await self.forward_build(pt, package_id, wanted)
            except PyrsiaError as exc:
                return BuildInfo("", package_id, "FAILED", f"no build could be requested: {exc}")
            return BuildInfo(str(status.get("build_id", "")), package_id, "REQUESTED",
                             str(status.get("status", "")))
        for _ in range(2):  # a joined build may have been for other artifacts
            running = self.start_build(pt, package_id, wanted)
            await running.done.wait()
            if running.status != "SUCCESS":
                outcome = "NOT_FOUND" if running.result == "NOT_FOUND" else "FAILED"
                return BuildInfo(running.id, package_id, outcome, running.reason)
            logged = await self._logged(pt, package_id)
            if all(a in logged for a in wanted):
                break
        return BuildInfo(running.id, package_id, "SUCCESS")

    def start_build(
        self, pt: PackageType, package_id: str, artifact_ids: Sequence[str] = ()
    ) -> Build:
        if self.task_group is None:
            raise BuildFailed("the node is not running")

        async def run(build: Build) -> int:
            return await self._build(pt, package_id, list(artifact_ids), build)

        return self.node.start_build(pt.record_type, package_id, run, self.task_group)

    async def _build(
        self, pt: PackageType, package_id: str, artifact_ids: list[str], build: Build
    ) -> int:
        sink = NodeSink(self.node)
        try:
            return await self._build_commit(pt, package_id, artifact_ids, build, sink)
        finally:
            await sink.discard()  # after a commit, everything kept is logged

    async def _build_commit(
        self, pt: PackageType, package_id: str, artifact_ids: list[str], build: Build,
        sink: NodeSink,
    ) -> int:
        """The one commit path of plugin builds: build into the node's store, sign one
        record per new artifact, log part lists of large blobs, commit (with consensus),
        announce."""
        try:
            built = await self.run_plugin_build(pt, package_id, artifact_ids, sink)
        except ArtifactUnavailable:
            build.result = "NOT_FOUND"
            raise
        logged = await self._logged(pt, package_id)
        for item in built:
            if item.artifact_id in logged and logged[item.artifact_id] != item.digest.hex:
                raise BuildFailed(f"the upstream now serves other bytes for {item.artifact_id} "
                                  "than the log vouches for; nothing committed")
        built = [item for item in built if item.artifact_id not in logged]
        if not built:
            build.records = 0
            return self.node.log_store.ledger.height
        now = int(self.node.clock.now())
        records = [
            Record.new(signer=self.node.signer, package_type=pt.record_type,
                       package_specific_id=package_id,
                       package_specific_artifact_id=item.artifact_id,
                       artifact_hash=item.digest.hex, num_artifacts=len(built),
                       timestamp=now)
            for item in built
        ]
        digests = list(dict.fromkeys(i.digest for i in built))
        # Large blobs also get a logged part list, so nodes fetching them at once can
        # share verified parts (swarm fetch); it rides in the same block.
        part_records = await self.node.part_list_records(digests, now)
        committed = await self.node.commit(records + part_records)
        sink.keep(*digests)
        build.records = len(records)
        if self.node.peers is not None and self.task_group is not None:
            self.task_group.start_soon(
                self.node.peers.announce,
                digests + [Digest.parse("sha256:" + r.artifact_hash) for r in part_records])
        log.info("Built %s %s: %d artifacts, block %d", pt.name, package_id, len(records),
                 committed.block.height)
        return committed.block.height

    async def rebuild_check(self, block: Block) -> bool:
        """Did this node, building every package of ``block`` itself (asking for each
        claimed artifact), get the claimed hash for every claimed artifact? Node records
        are checked elsewhere; an artifact of a type no plugin here builds is not
        vouched for."""
        packages: dict[tuple[str, str], set[tuple[str, str]]] = {}
        for sr in block.records:
            r = sr.record
            if r.operation != Operation.ADD_ARTIFACT or r.package_type == NODE_PACKAGE_TYPE:
                continue
            packages.setdefault((r.package_type, r.package_specific_id), set()).add(
                (r.package_specific_artifact_id, r.artifact_hash))
        for (record_type, package_id), claimed in packages.items():
            pt = self.by_record_type(record_type)
            if pt is None or not pt.can_build:
                log.warning("Cannot rebuild %s %s: no package type here builds it",
                            record_type, package_id)
                return False
            sink = NodeSink(self.node)
            try:
                built = await self.run_plugin_build(pt, package_id,
                                                    sorted(aid for aid, _ in claimed), sink)
                mine = {(item.artifact_id, item.digest.hex) for item in built}
                if not claimed <= mine:
                    log.warning("Proposal claims hashes for %s %s that differ from this "
                                "node's build", record_type, package_id)
                    return False
                # This validator can serve them too (and check their part lists).
                sink.keep(*(Digest(h) for _, h in claimed))
            except (PyrsiaError, DigestMismatch) as exc:
                log.warning("Could not rebuild %s %s to check a proposal: %s", record_type,
                            package_id, exc)
                return False
            finally:
                await sink.discard()
        return True

    # -- build requests between nodes --------------------------------------------------

    def build_request_handler(self) -> Callable[[Any], Awaitable[dict[str, Any]]]:
        """A BUILD_REQUEST handler: ``{"package_type", "package_id", "artifact_ids"}``."""

        async def handle(body: Any) -> dict[str, Any]:
            name = body.get("package_type") if isinstance(body, dict) else None
            pt = self.get(name) if isinstance(name, str) else None
            if pt is None:
                raise ValueError(f"BUILD_REQUEST for package type {str(name)[:40]!r}, which "
                                 f"this node does not have (it has: "
                                 f"{', '.join(sorted(self.hosts)) or 'none'})")
            if not self.node.is_build_node:
                raise BuildFailed("this node is not a build node")
            package_id = _parse(pt, str(body.get("package_id", "")))
            wanted = body.get("artifact_ids", [])
            if not isinstance(wanted, list) or len(wanted) > 100 or not all(
                    isinstance(a, str) for a in wanted):
                raise ValueError("artifact_ids must be a list of at most 100 strings")
            logged = await self._logged(pt, package_id)
            if logged and all(a in logged for a in wanted):
                return {"status": "EXISTS", "package_specific_id": package_id,
                        "reason": "Artifact already exists"}
            return self.start_build(pt, package_id, wanted).to_json()

        return handle

    async def forward_build(
        self, pt: PackageType, package_id: str, artifact_ids: Sequence[str] = ()
    ) -> dict[str, Any]:
        """On a regular node: send the build request to an authorized build node."""
        if self.node.peers is None:
            raise BuildFailed("no build node could be reached: none known")
        try:
            status, address = await self.node.peers.request_build(
                {"package_type": pt.name, "package_id": package_id,
                 "artifact_ids": list(artifact_ids)})
        except PyrsiaError as exc:
            raise BuildFailed(str(exc)) from None
        if "build_id" in status:
            self.forwarded[str(status["build_id"])] = address
        log.info("Sent a build request for %s %s to build node %s", pt.name, package_id,
                 status["build_node"][:16])
        return dict(status)

    async def forwarded_status(self, build_id: str) -> dict[str, Any] | None:
        """The status of a build this node forwarded, asked of the build node doing it."""
        address = self.forwarded.get(build_id)
        peers = self.node.peers
        if address is None or peers is None:
            return None
        env = await peers.rpc(address, "GET_BUILD", {"build_id": build_id}, {"BUILD_STATUS"})
        return dict(env.body)


def _timeout(pt: PackageType, name: str, default: float) -> float:
    """A package type's own timeout (``build_timeout``...), if it sets a sane one."""
    value = getattr(pt, name, None)
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 86400:
        return float(value)
    return default


def _parse(pt: PackageType, text: str) -> str:
    """``parse_package_id``; anything but a ``str`` or a ``ValueError`` is the plugin's fault."""
    try:
        normal = pt.parse_package_id(text)
    except ValueError:
        raise
    except Exception as exc:
        raise PluginFailed(plugin_label(pt.name),
                           f"parse_package_id raised {type(exc).__name__}: {exc}") from None
    if not isinstance(normal, str) or not normal or len(normal) > 1024:
        raise PluginFailed(plugin_label(pt.name), "parse_package_id returned garbage")
    return normal


# --------------------------------------------------------------------------- isolation

_Scope = MutableMapping[str, Any]


def _error_body(plugin: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": "PLUGIN_FAILED", "message": message,
                                   "detail": {"plugin": plugin}}]}).encode() + b"\n"


def _failed_app(reason: str) -> ASGIApp:
    async def app(scope: _Scope, receive: Any, send: Any) -> None:
        raise RuntimeError(reason)

    return app


def _valid_start(message: Any) -> bool:
    if not isinstance(message, Mapping) or message.get("type") != "http.response.start":
        return False
    status = message.get("status")
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        return False
    headers = message.get("headers", [])
    try:
        return all(isinstance(k, bytes) and isinstance(v, bytes) and b"\n" not in k + v
                   and b"\r" not in k + v and k for k, v in headers)
    except (TypeError, ValueError):
        return False


def _valid_body(message: Any) -> bool:
    return (isinstance(message, Mapping) and message.get("type") == "http.response.body"
            and isinstance(message.get("body", b""), bytes)
            and isinstance(message.get("more_body", False), bool))


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _zero_copy(message: Any, scope: _Scope) -> dict[str, Any] | None:
    """A well-formed zero-copy body message the server offers (``send_verified_blob``),
    normalised; ``None`` for anything else."""
    if not isinstance(message, Mapping):
        return None
    kind = message.get("type")
    extensions = scope.get("extensions") or {}
    path = message.get("path")
    if kind not in extensions or not isinstance(path, str) or not path or "\0" in path:
        return None
    if kind == "pyrsia.sendfile" and _int(message.get("offset")) and _int(message.get("count")):
        out = {"type": kind, "path": path, "offset": message["offset"],
               "count": message["count"]}
        if message.get("more_body") is True:  # a blob in flight: more ranges follow
            out["more_body"] = True
        return out
    if kind == "http.response.pathsend":
        return {"type": kind, "path": path}
    return None


class _PluginGarbage(Exception):
    pass


class _SendFailed(Exception):
    """The server's ``send`` failed (e.g. the client went away): not the plugin's fault."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


@attrs.define(eq=False)
class GuardedApp:
    """A plugin's ASGI app that cannot take the node down.

    The plugin must start its response within ``timeout`` seconds and send each next
    part within ``timeout``; every message it sends is checked. An exception, a hang
    or a malformed message becomes a 502 (or, if the response had started, a closed
    connection) whose error names the plugin; the node logs it and carries on.
    """

    app: ASGIApp
    plugin: str
    timeout: float

    async def __call__(self, scope: _Scope, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            return
        started = False
        finished = False
        deadline: list[anyio.CancelScope] = []

        async def guarded_send(message: Any) -> None:
            nonlocal started, finished
            if finished:
                raise _PluginGarbage("sent a message after the response ended")
            if not started:
                if not _valid_start(message):
                    raise _PluginGarbage(f"sent {_describe(message)} instead of a valid "
                                         "http.response.start")
                started = True
                message = {"type": "http.response.start", "status": message["status"],
                           "headers": list(message.get("headers", []))}
            elif (zero_copy := _zero_copy(message, scope)) is not None:
                message, finished = zero_copy, not zero_copy.get("more_body", False)
            else:
                if not _valid_body(message):
                    raise _PluginGarbage(f"sent {_describe(message)} instead of "
                                         "http.response.body")
                message = {"type": "http.response.body", "body": message.get("body", b""),
                           "more_body": message.get("more_body", False)}
                finished = not message["more_body"]
            try:
                await send(message)
            except Exception as exc:
                raise _SendFailed(exc) from exc
            if deadline:  # it made progress: a fresh timeout for the next part
                deadline[0].deadline = anyio.current_time() + self.timeout

        reason = ""
        try:
            with anyio.CancelScope() as scope_:
                deadline.append(scope_)
                scope_.deadline = anyio.current_time() + self.timeout
                await self.app(scope, receive, guarded_send)
            if scope_.cancelled_caught:
                reason = f"no response within {self.timeout:g} s"
            elif not finished:
                reason = "returned without completing its response"
        except TransferAborted as exc:
            # A blob in flight failed its verification: the response is cut short
            # (the server closes the connection), which is not the plugin's fault.
            log.warning("Cut short %s %s: %s", scope.get("method", ""),
                        str(scope.get("path", ""))[:200], exc)
            if started:
                raise  # the server closes the connection (and says no more of it)
            reason = str(exc)
        except _PluginGarbage as exc:
            reason = str(exc)
        except _SendFailed as exc:
            raise exc.cause from None
        except Exception as exc:
            reason = f"raised {type(exc).__name__}: {exc}"
        if not reason:
            return
        message = f"package type plugin {self.plugin} failed: {reason}"
        path = str(scope.get("path", ""))[:200]
        log.error("%s (request %s %s)", message, scope.get("method", ""), path)
        if started:
            # Headers are out: returning unfinished makes the server close the connection,
            # so the client cannot take a truncated body for a whole one.
            return
        body = _error_body(self.plugin, message)
        await send({"type": "http.response.start", "status": 502,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": b"" if scope.get("method") == "HEAD"
                    else body})


def _describe(message: Any) -> str:
    if isinstance(message, Mapping):
        return f"a {str(message.get('type'))[:60]!r} message"
    return f"a {type(message).__name__}"
