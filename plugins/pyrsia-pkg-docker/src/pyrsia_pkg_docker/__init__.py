"""Pyrsia's Docker/OCI package type and OCI registry upstream."""

from ._model import (
    ALL_MANIFEST_TYPES,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEX_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    DockerPackageType,
    ImageRef,
    Manifest,
    ManifestError,
    ReferenceError_,
    choose_platform,
    reference_text,
    validate_repository,
    validate_tag,
)
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
    "ImageRef",
    "Manifest",
    "ManifestError",
    "ReferenceError_",
    "RegistryUpstream",
    "UpstreamError",
    "choose_platform",
    "reference_text",
    "validate_repository",
    "validate_tag",
]
