"""Fixtures for the cross-distribution tests (real registry, nodes, clients)."""

from __future__ import annotations

import pytest
from support.fixtures import (  # noqa: F401  (fixtures are found by name)
    fresh_seeded_upstream,
    podman_dir,
    seeded_upstream,
    token_upstream,
    upstream_registry,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
