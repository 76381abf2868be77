"""Storage tests run on asyncio (the node's runtime); the stores are backend-neutral."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
