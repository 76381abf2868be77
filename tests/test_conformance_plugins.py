"""The plugins against the ``pyrsia_core.testing.conformance`` suites.

``RegistryUpstream`` runs :class:`UpstreamConformance` against a real local
registry (plain, and behind Docker Hub-style bearer-token auth), and
``DockerPackageType`` runs :class:`PackageTypeConformance` over the manifests
of the seeded test images.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence

import httpx
import pytest
from pyrsia_core.testing.conformance import PackageTypeConformance, UpstreamConformance
from pyrsia_pkg_docker import ALL_MANIFEST_TYPES, DockerPackageType, RegistryUpstream
from support.fixtures import ImageInfo, SeededUpstream
from support.tokenauth import TokenAuthRegistry

from pyrsia_core import Digest

pytestmark = pytest.mark.process

ALPINE = "library/alpine:3.16.2"


@pytest.fixture(scope="module")
def upstream_content(seeded_upstream: SeededUpstream) -> list[tuple[str, bytes]]:
    """``(locator, bytes)`` of manifests (by tag and digest) and blobs in the seeded registry.

    Blob bytes are read with a plain HTTP client and checked against their
    digests, so the expectations do not depend on the code under test.
    """
    alpine = seeded_upstream.images[ALPINE]
    multi = seeded_upstream.images["library/multi:1.0"]
    oci = seeded_upstream.images["library/ociimage:1.0"]
    nested = seeded_upstream.images["some/nested/repo:v1"]
    content = [
        ("library/alpine/manifests/3.16.2", alpine.manifest),
        (f"library/alpine/manifests/{alpine.manifest_digest}", alpine.manifest),
        ("library/multi/manifests/1.0", multi.manifest),
        (f"library/ociimage/manifests/{oci.manifest_digest}", oci.manifest),
        ("some/nested/repo/manifests/v1", nested.manifest),
    ]
    blobs = [("library/alpine", d) for d in alpine.blob_digests]
    blobs += [("library/ociimage", d) for d in oci.layer_digests]
    with httpx.Client(base_url=seeded_upstream.url, timeout=30.0, trust_env=False) as client:
        for repo, digest in blobs:
            resp = client.get(f"/v2/{repo}/blobs/{digest}")
            resp.raise_for_status()
            assert "sha256:" + hashlib.sha256(resp.content).hexdigest() == digest
            content.append((f"{repo}/blobs/{digest}", resp.content))
    return content


class TestRegistryUpstream(UpstreamConformance):
    @pytest.fixture
    async def upstream(self, seeded_upstream: SeededUpstream) -> AsyncIterator[RegistryUpstream]:
        async with RegistryUpstream(seeded_upstream.url, timeout=30.0) as upstream:
            yield upstream

    @pytest.fixture
    def known(self, upstream_content: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        return upstream_content

    @pytest.fixture
    def missing(self) -> str:
        return "library/alpine/manifests/no-such-tag"

    @pytest.fixture
    def accept(self) -> Sequence[str]:
        return ALL_MANIFEST_TYPES


class TestRegistryUpstreamMissingBlob(TestRegistryUpstream):
    """A missing blob (not a manifest) of an existing repository."""

    @pytest.fixture
    def missing(self) -> str:
        return f"library/alpine/blobs/{Digest.of(b'not in the registry')}"


class TestTokenAuthRegistryUpstream(TestRegistryUpstream):
    @pytest.fixture
    async def upstream(self, token_upstream: TokenAuthRegistry) -> AsyncIterator[RegistryUpstream]:
        async with RegistryUpstream(token_upstream.url, timeout=30.0) as upstream:
            yield upstream


def _image_artifacts(short: str, tag: str, info: ImageInfo) -> dict[str, str]:
    """The artifact ids and digests the seed's record layout gives an image: the tag,
    then ``short@digest`` for each manifest, config and layer (from the seeding, not from
    the code under test)."""
    out = {f"{short}:{tag}": info.manifest_digest, f"{short}@{info.manifest_digest}":
           info.manifest_digest}
    images = list(info.platforms.values()) if info.is_index else [info]
    for digest in (info.platform_manifest_digests.values() if info.is_index else ()):
        out[f"{short}@{digest}"] = digest
    for image in images:
        for digest in image.blob_digests:
            out[f"{short}@{digest}"] = digest
    return out


class TestDockerPackageType(PackageTypeConformance):
    """The Docker plugin runs the suite any third-party package type runs, building from
    a real local registry."""

    @pytest.fixture
    def package_type(self, seeded_upstream: SeededUpstream) -> DockerPackageType:
        return DockerPackageType.from_config({"upstream": seeded_upstream.url})

    @pytest.fixture
    def builds(self, seeded_upstream: SeededUpstream) -> list[tuple[str, dict[str, str]]]:
        images = seeded_upstream.images
        return [
            ("alpine:3.16.2", _image_artifacts("alpine", "3.16.2", images[ALPINE])),
            ("multi:1.0", _image_artifacts("multi", "1.0", images["library/multi:1.0"])),
            ("some/nested/repo:v1", _image_artifacts("some/nested/repo", "v1",
                                                     images["some/nested/repo:v1"])),
        ]

    @pytest.fixture
    def missing_packages(self) -> list[str]:
        return ["alpine:no-such-tag", "no/such/repository:1"]

    @pytest.fixture
    def valid_ids(self, seeded_upstream: SeededUpstream) -> list[str]:
        digest = seeded_upstream.images[ALPINE].manifest_digest
        return [
            "alpine:3.16.2",
            "library/alpine:3.16.2",
            "docker.io/library/alpine:3.16.2",
            "alpine",
            "some/nested/repo:v1",
            "localhost/x:1",
            f"alpine@{digest}",
            f"alpine:3.16.2@{digest}",
        ]

    @pytest.fixture
    def invalid_ids(self) -> list[str]:
        return [
            "",
            "Alpine:3.16.2",
            "alpine:",
            ":3.16.2",
            "alpine 3",
            "alpine:-tag",
            "alpine@sha256:xyz",
            "alpine@md5:" + "0" * 32,
            "a" * 600,
            "alpine:" + "t" * 200,
        ]

    @pytest.fixture
    def samples(self, seeded_upstream: SeededUpstream) -> list[tuple[bytes, str, list[str]]]:
        out: list[tuple[bytes, str, list[str]]] = []
        for info in seeded_upstream.images.values():
            if info.is_index:
                out.append(
                    (info.manifest, info.media_type, list(info.platform_manifest_digests.values()))
                )
                for image in info.platforms.values():
                    out.append((image.manifest, image.media_type, list(image.blob_digests)))
            else:
                out.append(
                    (
                        info.manifest,
                        info.media_type,
                        [info.config_digest or "", *info.layer_digests],
                    )
                )
        return out
