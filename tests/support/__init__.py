"""Test harness for pyrsia's integration tests: a real upstream registry, deterministic images,
a bearer-token upstream and the skopeo/podman clients. Everything binds 127.0.0.1 only.

Modules: :mod:`.net`, :mod:`.registry`, :mod:`.images`, :mod:`.tokenauth`, :mod:`.clients`,
:mod:`.fixtures` (pytest fixtures).
"""

from .clients import ToolError, podman, skopeo, write_registries_conf
from .images import (
    STANDARD_IMAGES,
    ImageInfo,
    ImageSpec,
    PlatformImage,
    fetch_image_info,
    make_image_layout,
    make_multiarch_layout,
    push,
    seed_images,
)
from .net import free_port, wait_for_http
from .registry import AccessLogEntry, UpstreamRegistry
from .tokenauth import TokenAuthRegistry, TokenServer

__all__ = [
    "STANDARD_IMAGES",
    "AccessLogEntry",
    "ImageInfo",
    "ImageSpec",
    "PlatformImage",
    "TokenAuthRegistry",
    "TokenServer",
    "ToolError",
    "UpstreamRegistry",
    "fetch_image_info",
    "free_port",
    "make_image_layout",
    "make_multiarch_layout",
    "podman",
    "push",
    "seed_images",
    "skopeo",
    "wait_for_http",
    "write_registries_conf",
]
