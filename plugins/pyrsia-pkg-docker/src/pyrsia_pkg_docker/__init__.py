"""Pyrsia's Docker/OCI package type: the OCI Distribution pull API (``/v2``), image
builds from a registry (token auth, manifest lists and platforms), and the registry
upstream. It uses :mod:`pyrsia_core` only, like any third-party package type."""

from ._model import (
    ALL_MANIFEST_TYPES,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEX_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    ImageRef,
    Manifest,
    ManifestError,
    ReferenceError_,
    choose_platform,
    reference_text,
    validate_repository,
    validate_tag,
)
from ._oci import OciApp
from ._package import DockerPackageType
from ._service import DockerService, NotInLog
from ._upstream import RegistryUpstream, UpstreamError

__all__ = [
    "ALL_MANIFEST_TYPES",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "INDEX_TYPES",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "Descriptor",
    "DockerPackageType",
    "DockerService",
    "ImageRef",
    "Manifest",
    "ManifestError",
    "NotInLog",
    "OciApp",
    "ReferenceError_",
    "RegistryUpstream",
    "UpstreamError",
    "choose_platform",
    "reference_text",
    "validate_repository",
    "validate_tag",
]
