"""pyrsia-storage-fs: a content-addressed, crash-safe BlobStore on the local filesystem.

Registered as ``fs`` in the ``pyrsia.blob_store`` entry-point group; the factory
takes ``path`` (required) and ``quota_bytes`` (optional).
"""

from __future__ import annotations

from ._store import CHUNK_SIZE, FsBlobStore

__version__ = "0.1.0"

__all__ = ["CHUNK_SIZE", "FsBlobStore", "__version__"]
