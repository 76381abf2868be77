"""pyrsia-storage-leveldb: an ordered, atomic KeyValueStore on LevelDB (plyvel).

Registered as ``leveldb`` in the ``pyrsia.kv_store`` entry-point group; the
factory takes ``path`` (required) and ``sync`` (optional, default true).
"""

from __future__ import annotations

from ._store import SCAN_CHUNK, LevelDBStore

__version__ = "0.1.0"

__all__ = ["SCAN_CHUNK", "LevelDBStore", "__version__"]
