"""Test doubles for the plugin interfaces (STYLE P11).

Pure: importing this package loads no async library, pytest or I/O module. The
conformance suites for plugin authors live in :mod:`pyrsia_core.testing.conformance`
(a separate module, since it imports pytest).
"""

from __future__ import annotations

from ._memory import (
    FakeClock,
    MemoryBlobStore,
    MemoryKeyValueStore,
    MemoryPackageType,
    PackageIdError,
)
from ._network import (
    Delivery,
    MemoryNetwork,
    MemoryPeerClient,
    MemoryTransport,
    MemoryUpstream,
    PeerFaults,
    UpstreamCall,
    UpstreamNotFoundError,
    store_blob_source,
)

__all__ = [
    "Delivery",
    "FakeClock",
    "MemoryBlobStore",
    "MemoryKeyValueStore",
    "MemoryNetwork",
    "MemoryPackageType",
    "MemoryPeerClient",
    "MemoryTransport",
    "MemoryUpstream",
    "PackageIdError",
    "PeerFaults",
    "UpstreamCall",
    "UpstreamNotFoundError",
    "store_blob_source",
]
