"""Public face of Kademlia content routing (see :mod:`pyrsia_core._kademlia`).

Sans-I/O and deterministic: a routing table of k-buckets, the iterative lookup state
machine, a provider-record store, and a seeded simulation of whole networks.
"""

from ._kademlia import (
    DEFAULT_ALPHA,
    DEFAULT_K,
    ID_BITS,
    ID_SIZE,
    MAX_ADDRESS_LENGTH,
    QUERY_TRANSITIONS,
    Contact,
    Lookup,
    LookupKind,
    ProviderStore,
    QueryState,
    RoutingTable,
    SimNetwork,
    SimReport,
    xor_distance,
)

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_K",
    "ID_BITS",
    "ID_SIZE",
    "MAX_ADDRESS_LENGTH",
    "QUERY_TRANSITIONS",
    "Contact",
    "Lookup",
    "LookupKind",
    "ProviderStore",
    "QueryState",
    "RoutingTable",
    "SimNetwork",
    "SimReport",
    "xor_distance",
]
