"""Package-type plugins on a node: their routes, their builds, and their failures.

A :class:`~pyrsia_core.interfaces.PackageType` that sets ``mount_path`` gets a
:class:`PluginHost` (log lookups, verified artifact reads, builds through the same
commit/consensus path as Docker builds) and its ASGI app is mounted under that path,
behind a :class:`GuardedApp`: a plugin that raises, hangs or sends garbage fails that
request -- with an error naming the plugin, within ``timeout`` -- and nothing else.

Validators rebuild plugin packages with :meth:`PackageService.rebuild_check`,
dispatched by each record's ``package_type``. Docker keeps its own path
(:class:`~pyrsia_registry.DockerService`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
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
)
from pyrsia_core.interfaces import (
    ASGIApp,
    BuildInfo,
    BuiltArtifact,
    LoggedArtifact,
    PackageHost,
    PackageType,
)

from pyrsia_core import NODE_PACKAGE_TYPE, Block, Digest, Operation, Record
from pyrsia_core import plugins as core_plugins

from ._node import Build, Node

__all__ = ["GuardedApp", "PackageService", "PluginHost"]

log = logging.getLogger("pyrsia.packages")
DOCKER_RECORD_TYPE = "Docker"
RESERVED_PATHS = ("/v2", "/api", "/p2p")


def plugin_label(name: str) -> str:
    """``maven (pyrsia-pkg-maven 0.1.0)``: how errors name a package-type plugin."""
    try:
        spec = core_plugins.available("pyrsia.package_type").get(name)
    except PyrsiaError:
        spec = None
    return f"{name} ({spec.dist})" if spec is not None else name


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

    async def _vouched(self, artifact: LoggedArtifact) -> bool:
        for rec in await self.node.records_for_artifact(artifact.digest):
            r = rec.signed.record
            if (r.package_type == self.package_type.record_type
                    and r.operation == Operation.ADD_ARTIFACT
                    and r.package_specific_id == artifact.package_id
                    and r.package_specific_artifact_id == artifact.artifact_id):
                return True
        return False

    async def _local(self, digest: Digest) -> bytes | None:
        if await self.node.local_blob(digest) is None:
            return None
        data = await self.node.blobs.read_bytes(digest)
        if Digest.of(data) != digest:
            log.error("Stored blob %s is corrupt; deleted, fetching it again", digest)
            await self.node.blobs.delete(digest)
            return None
        await self.node.touch(digest)
        return data

    async def read_artifact(self, artifact: LoggedArtifact) -> bytes:
        if not isinstance(artifact, LoggedArtifact) or not await self._vouched(artifact):
            raise ArtifactUnavailable(f"{getattr(artifact, 'artifact_id', artifact)!r:.200} is "
                                      "not in the transparency log")
        digest = artifact.digest
        data = await self._local(digest)
        if data is not None:
            return data
        async with self.node.fetch_lock(digest):
            data = await self._local(digest)
            if data is not None:
                return data
            peers = self.node.peers
            if peers is not None and len(peers.table):
                try:
                    await peers.fetch(digest)
                    log.info("%s (%s) pulled from a peer", artifact.artifact_id, digest)
                    data = await self._local(digest)
                    if data is not None:
                        return data
                except PyrsiaError as exc:
                    log.warning("Peers could not provide %s: %s", artifact.artifact_id, exc)
            if not self.node.is_build_node:
                raise ArtifactUnavailable(f"{artifact.artifact_id} is not stored here and no "
                                          "peer provides it")
            # A build node fetches it again from the upstream: the bytes must still be
            # the ones the log vouches for.
            built = await self.service.run_plugin_build(self.package_type, artifact.package_id,
                                                        [artifact.artifact_id])
            for item in built:
                if item.artifact_id == artifact.artifact_id and item.digest == digest:
                    await self.node.make_room(len(item.data))
                    await self.node.blobs.put_bytes(item.data, expected=digest)
                    log.info("%s (%s) fetched again from the upstream", artifact.artifact_id,
                             digest)
                    return item.data
            log.error("The upstream now serves other bytes for %s than the log vouches for "
                      "(%s); not served", artifact.artifact_id, digest)
            raise ArtifactUnavailable(
                f"the upstream no longer provides {artifact.artifact_id} with the logged digest "
                f"{digest} (tampered or changed upstream); not served")

    async def build(self, package_id: str, *, artifact_ids: Sequence[str] = ()) -> BuildInfo:
        return await self.service.build(self.package_type, package_id, artifact_ids)


@attrs.define(eq=False)
class PackageService:
    """The node's package-type plugins other than Docker: mounts, builds, rebuild checks."""

    node: Node
    task_group: anyio.abc.TaskGroup | None = None
    #: Seconds a plugin may take to build, or to start (and continue) a response.
    timeout: float = 60.0
    hosts: dict[str, PluginHost] = attrs.Factory(dict)

    def __attrs_post_init__(self) -> None:
        for name, pt in self.node.package_types.items():
            if name != "docker" and isinstance(pt, PackageType):
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
            out[path.rstrip("/")] = GuardedApp(app, label, self.timeout)
            log.info("Package type %s serves %s", label, path)
        return out

    # -- builds --------------------------------------------------------------------------

    async def run_plugin_build(
        self, pt: PackageType, package_id: str, artifact_ids: Sequence[str] = ()
    ) -> list[BuiltArtifact]:
        """The plugin's checked build, bounded by the timeout; failures name the plugin."""
        label = plugin_label(pt.name)
        try:
            with anyio.fail_after(self.timeout):
                return await pt.build(package_id, artifact_ids=artifact_ids)
        except TimeoutError:
            raise PluginFailed(label, f"build of {package_id!r:.200} did not finish within "
                               f"{self.timeout:g} s") from None
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
        try:
            built = await self.run_plugin_build(pt, package_id, artifact_ids)
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
        created = await self._store(built)
        try:
            now = int(self.node.clock.now())
            records = [
                Record.new(signer=self.node.signer, package_type=pt.record_type,
                           package_specific_id=package_id,
                           package_specific_artifact_id=item.artifact_id,
                           artifact_hash=item.digest.hex, num_artifacts=len(built),
                           timestamp=now)
                for item in built
            ]
            committed = await self.node.commit(records)
        except BaseException:
            with anyio.CancelScope(shield=True):
                for digest in created:
                    await self.node.blobs.delete(digest)
            raise
        build.records = len(records)
        if self.node.peers is not None and self.task_group is not None:
            self.task_group.start_soon(self.node.peers.announce,
                                       list(dict.fromkeys(i.digest for i in built)))
        log.info("Built %s %s: %d artifacts, block %d", pt.name, package_id, len(records),
                 committed.block.height)
        return committed.block.height

    async def _store(self, built: list[BuiltArtifact]) -> list[Digest]:
        """Store the (already checked) artifacts; the digests this call added."""
        created: list[Digest] = []
        try:
            for item in built:
                if await self.node.local_blob(item.digest) is None:
                    await self.node.make_room(len(item.data))
                    await self.node.blobs.put_bytes(item.data, expected=item.digest)
                    created.append(item.digest)
        except BaseException:
            with anyio.CancelScope(shield=True):
                for digest in created:
                    await self.node.blobs.delete(digest)
            raise
        return created

    async def rebuild_check(self, block: Block) -> bool:
        """Did this node, building every plugin package of ``block`` itself (asking for
        each claimed artifact), get the claimed hash for every claimed artifact? Docker
        and node records are checked elsewhere; an artifact of a type no plugin here
        builds is not vouched for."""
        packages: dict[tuple[str, str], set[tuple[str, str]]] = {}
        for sr in block.records:
            r = sr.record
            if r.operation != Operation.ADD_ARTIFACT or r.package_type in (
                    DOCKER_RECORD_TYPE, NODE_PACKAGE_TYPE):
                continue
            packages.setdefault((r.package_type, r.package_specific_id), set()).add(
                (r.package_specific_artifact_id, r.artifact_hash))
        for (record_type, package_id), claimed in packages.items():
            pt = self.by_record_type(record_type)
            if pt is None or not pt.can_build:
                log.warning("Cannot rebuild %s %s: no package type here builds it",
                            record_type, package_id)
                return False
            try:
                built = await self.run_plugin_build(pt, package_id,
                                                    sorted(aid for aid, _ in claimed))
                mine = {(item.artifact_id, item.digest.hex) for item in built}
                if not claimed <= mine:
                    log.warning("Proposal claims hashes for %s %s that differ from this "
                                "node's build", record_type, package_id)
                    return False
                await self._store(built)  # this validator can serve them too
            except (PyrsiaError, DigestMismatch) as exc:
                log.warning("Could not rebuild %s %s to check a proposal: %s", record_type,
                            package_id, exc)
                return False
        return True

    # -- build requests between nodes --------------------------------------------------

    def build_request_handler(
        self, docker: Callable[[Any], Awaitable[dict[str, Any]]]
    ) -> Callable[[Any], Awaitable[dict[str, Any]]]:
        """A BUILD_REQUEST handler: plugin package types here, Docker to ``docker``."""

        async def handle(body: Any) -> dict[str, Any]:
            name = body.get("package_type", "docker") if isinstance(body, dict) else None
            pt = self.get(name) if isinstance(name, str) else None
            if pt is None:
                return await docker(body)
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
            status, _ = await self.node.peers.request_build(
                {"package_type": pt.name, "package_id": package_id,
                 "artifact_ids": list(artifact_ids)})
        except PyrsiaError as exc:
            raise BuildFailed(str(exc)) from None
        log.info("Sent a build request for %s %s to build node %s", pt.name, package_id,
                 status["build_node"][:16])
        return status


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
