"""The Docker package type: Docker/OCI images, built from a registry, served at ``/v2``.

A package-type plugin like any other: the node hands it a
:class:`~pyrsia_core.interfaces.PackageHost`, mounts its OCI Distribution app at
``/v2`` and calls its build (with an :class:`~pyrsia_core.interfaces.ArtifactSink`)
on build nodes and on validators re-checking a proposed block.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import ClassVar

from pyrsia_core.errors import ArtifactUnavailable, BuildFailed
from pyrsia_core.interfaces import (
    ArtifactSink,
    ASGIApp,
    BuiltArtifact,
    LoggedArtifact,
    PackageHost,
    PackageType,
    Upstream,
)

from pyrsia_core import Digest

from ._model import DOCKER_HUB, ImageRef, Manifest
from ._oci import OciApp
from ._registries import RegistrySource, parse_registries
from ._service import DockerBuilder, DockerService, fetch_blob
from ._upstream import RegistryUpstream

__all__ = ["DockerPackageType"]


class DockerPackageType(PackageType):
    """Docker/OCI images: ``package_type`` "Docker" in log records.

    Config: ``upstream`` (the Docker Hub URL this package type builds from; default: the
    node's upstream, ``pyrsia node start --upstream``); ``registries``
    (``ghcr.io=URL,quay.io=URL``: other registries mirrored, each its own upstream;
    ``pyrsia node start --upstream ghcr.io=URL``); ``credentials``
    (``ghcr.io=/path/file,...``: a file holding ``user:password`` for that registry);
    ``upstream_options`` (``idle_timeout=30,...``: the node's ``--upstream-option`` values,
    for those registries).
    """

    name: ClassVar[str] = "docker"
    record_type: ClassVar[str] = "Docker"
    mount_path: ClassVar[str] = "/v2"
    id_param: ClassVar[str] = "image"
    id_example: ClassVar[str] = "alpine:3.16.3"
    #: Images may have multi-gigabyte layers: a build is bounded by the upstream's own
    #: timeouts (per request, minimum rate), and by this in all.
    build_timeout: ClassVar[float | None] = 6 * 3600.0
    #: A client pulling a layer of an image being built waits for that layer.
    response_timeout: ClassVar[float | None] = 3600.0

    def __init__(self, upstream: str | None = None, *,
                 registries: Mapping[str, RegistrySource] | None = None) -> None:
        self.upstream_url = upstream or None
        #: Registries besides Docker Hub this node mirrors, by host name.
        self.registries: dict[str, RegistrySource] = dict(registries or {})
        self.builder = DockerBuilder()
        self._host: PackageHost | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, str] | None = None) -> DockerPackageType:
        config = config or {}
        return cls(config.get("upstream") or None,
                   registries=parse_registries(config.get("registries", ""),
                                               config.get("credentials", ""),
                                               config.get("upstream_options", "")))

    # -- pure --------------------------------------------------------------------------

    def parse_package_id(self, text: str) -> str:
        return ImageRef.parse(text).package_id

    def references(self, content: bytes, media_type: str) -> list[tuple[Digest, str]]:
        m = Manifest.parse(content, media_type)
        return [(d.digest, d.media_type) for d in m.children]

    # -- serving -----------------------------------------------------------------------

    def asgi_app(self, host: PackageHost) -> ASGIApp:
        self._host = host
        return OciApp(DockerService(self.builder, host,
                                    frozenset({DOCKER_HUB, *self.registries})))

    async def artifact_types(self, package_id: str) -> Mapping[str, str]:
        """The image's referrers (signatures, SBOMs...): their artifact types."""
        if self._host is None:
            return {}
        ref = ImageRef.parse(package_id)
        service = DockerService(self.builder, self._host)
        return {ref.artifact_id(r.digest): r.artifact_type
                for r in await service.package_referrers(ref, package_id)}

    # -- building ----------------------------------------------------------------------

    def _upstream(self, registry: str = DOCKER_HUB) -> tuple[Upstream, bool]:
        """The registry to build from, and whether this call opened it (and closes it)."""
        if registry != DOCKER_HUB:
            source = self.registries.get(registry)
            if source is None:
                raise BuildFailed(f"this node does not mirror the registry {registry}")
            return source.open(), True
        if self.upstream_url is not None:
            return RegistryUpstream(self.upstream_url), True
        host_upstream = self._host.upstream if self._host is not None else None
        if host_upstream is None:
            raise BuildFailed("this node has no upstream to build from")
        return host_upstream, False

    async def _build_into(
        self, package_id: str, artifact_ids: Sequence[str], sink: ArtifactSink
    ) -> AsyncIterator[BuiltArtifact]:
        """The image's manifests (the index and each platform's), configs and layers,
        each streamed into ``sink`` and verified against the digest that names it."""
        ref = ImageRef.parse(package_id)
        upstream, owned = self._upstream(ref.registry)
        try:
            async for item in self.builder.build(ref, upstream, sink):
                yield item
        finally:
            if owned:
                await upstream.aclose()

    async def fetch_artifact(self, artifact: LoggedArtifact, sink: ArtifactSink) -> bool:
        """One logged blob (or manifest) again from the upstream, by digest."""
        try:
            ref = ImageRef.parse(artifact.package_id)
        except ValueError:
            raise ArtifactUnavailable(f"{artifact.package_id!r:.200} is not an image") from None
        upstream, owned = self._upstream(ref.registry)
        try:
            await fetch_blob(ref, upstream, sink, artifact.digest, None, "re-fetch")
        finally:
            if owned:
                await upstream.aclose()
        return True
