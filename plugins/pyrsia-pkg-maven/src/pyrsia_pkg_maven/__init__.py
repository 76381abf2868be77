"""Pyrsia's Maven package type: ``/maven2`` served from the transparency log.

Registered under the ``pyrsia.package_type`` entry-point group as ``maven``; uses
only the public API of :mod:`pyrsia_core` (:class:`~pyrsia_core.interfaces.PackageType`
and :class:`~pyrsia_core.interfaces.PackageHost`).
"""

from ._model import Gav, Pom, PomError, metadata_xml, parse_metadata, parse_path, version_key
from ._package import DEFAULT_UPSTREAM, RECORD_TYPE, MavenPackageType, MavenUpstreamError

__all__ = [
    "DEFAULT_UPSTREAM",
    "RECORD_TYPE",
    "Gav",
    "MavenPackageType",
    "MavenUpstreamError",
    "Pom",
    "PomError",
    "metadata_xml",
    "parse_metadata",
    "parse_path",
    "version_key",
]
