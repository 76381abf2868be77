"""pytest fixtures over the harness. Enable with ``pytest_plugins = ["support.fixtures"]`` in
``tests/conftest.py``, or import the fixture names into a test module.

- ``upstream_registry`` (function): an empty, unauthenticated registry, fresh for each test.
- ``seeded_upstream`` (session): a registry holding :data:`support.images.STANDARD_IMAGES`;
  read-only: do not push to it, delete from it or stop it (use ``fresh_seeded_upstream``).
- ``fresh_seeded_upstream`` (function): the same content in a registry of the test's own.
- ``token_upstream`` (session): a :class:`TokenAuthRegistry` serving ``seeded_upstream``'s
  content behind anonymous bearer-token auth; its counters are cumulative, so compare
  ``mark()`` / ``token_server.request_count`` before and after.
- ``podman_dir`` (function): a temp dir for :func:`support.clients.podman`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .clients import podman_cleanup
from .images import ImageInfo, seed_images
from .registry import UpstreamRegistry
from .tokenauth import TokenAuthRegistry

__all__ = [
    "SeededUpstream",
    "fresh_seeded_upstream",
    "podman_dir",
    "seeded_upstream",
    "token_upstream",
    "upstream_registry",
]


@dataclass(frozen=True)
class SeededUpstream:
    """A running registry and what :func:`seed_images` put in it (keys ``"repo:tag"``)."""

    registry: UpstreamRegistry
    images: dict[str, ImageInfo]

    @property
    def url(self) -> str:
        return self.registry.url

    @property
    def host(self) -> str:
        return self.registry.host

    def __getitem__(self, reference: str) -> ImageInfo:
        return self.images[reference]


@pytest.fixture
def upstream_registry(tmp_path: Path) -> Iterator[UpstreamRegistry]:
    with UpstreamRegistry(tmp_path / "upstream") as registry:
        yield registry


@pytest.fixture(scope="session")
def seeded_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeededUpstream]:
    base = tmp_path_factory.mktemp("seeded-upstream")
    with UpstreamRegistry(base / "registry") as registry:
        images = seed_images(registry, workdir=base / "layouts")
        yield SeededUpstream(registry, images)


@pytest.fixture
def fresh_seeded_upstream(tmp_path: Path) -> Iterator[SeededUpstream]:
    with UpstreamRegistry(tmp_path / "upstream") as registry:
        images = seed_images(registry, workdir=tmp_path / "layouts")
        yield SeededUpstream(registry, images)


@pytest.fixture(scope="session")
def token_upstream(
    seeded_upstream: SeededUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TokenAuthRegistry]:
    base = tmp_path_factory.mktemp("token-upstream")
    with TokenAuthRegistry(base, backing=seeded_upstream.registry) as registry:
        yield registry


@pytest.fixture
def podman_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "podman"
    path.mkdir()
    yield path
    podman_cleanup(path)
