"""The registries a node mirrors besides Docker Hub, and their credentials.

``registries``: ``ghcr.io=http://127.0.0.1:5001,quay.io=https://quay.io`` (the node's
``--upstream ghcr.io=URL``, repeatable); ``credentials``: ``ghcr.io=/path/file`` where the
file holds ``user:password`` (``--upstream-credentials``). Credentials are read when a
build opens the registry, and never logged.
"""

from __future__ import annotations

from pathlib import Path

import attrs
from pyrsia_core.errors import UsageError

from ._model import DOCKER_HUB, ReferenceError_, validate_registry
from ._upstream import RegistryUpstream

__all__ = ["WELL_KNOWN_REGISTRIES", "RegistrySource", "parse_registries"]

#: Public registries named without a URL (``--upstream ghcr.io``): their own endpoints.
WELL_KNOWN_REGISTRIES = {
    "gcr.io": "https://gcr.io",
    "ghcr.io": "https://ghcr.io",
    "quay.io": "https://quay.io",
    "registry.k8s.io": "https://registry.k8s.io",
}


@attrs.frozen
class RegistrySource:
    """One mirrored registry: its URL, and a ``user:password`` file if it needs one."""

    url: str
    credentials_file: Path | None = attrs.field(default=None, repr=False)
    #: Upstream options (``timeout``, ``min_rate``, ``rate_window``, ``idle_timeout``):
    #: the node's ``--upstream-option`` values, as for Docker Hub.
    options: tuple[tuple[str, str], ...] = ()

    def credentials(self) -> tuple[str, str] | None:
        if self.credentials_file is None:
            return None
        try:
            text = self.credentials_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UsageError(f"cannot read the credentials file {self.credentials_file}: "
                             f"{exc.strerror}") from None
        user, sep, password = text.partition(":")
        if not sep or not user:
            raise UsageError(f"the credentials file {self.credentials_file} must hold "
                             "user:password")
        return user, password

    def open(self) -> RegistryUpstream:
        return RegistryUpstream.from_config({**dict(self.options), "url": self.url},
                                            auth=self.credentials())


def _pairs(text: str, what: str, defaults: dict[str, str] | None = None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        host, sep, value = item.partition("=")
        if not sep and defaults and host.strip().lower() in defaults:
            sep, value = "=", defaults[host.strip().lower()]
        if not sep or not value:
            raise UsageError(f"{what} {item[:100]!r}: expected REGISTRY=VALUE")
        try:
            out[validate_registry(host.strip())] = value.strip()
        except ReferenceError_ as exc:
            raise UsageError(f"{what} {item[:100]!r}: {exc}") from None
    return out


def parse_registries(registries: str, credentials: str = "",
                     upstream_options: str = "") -> dict[str, RegistrySource]:
    """``registries``, ``credentials`` and ``upstream_options`` (``idle_timeout=30,...``)
    options -> ``{host: RegistrySource}``."""
    options: list[tuple[str, str]] = []
    for item in filter(None, (part.strip() for part in upstream_options.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"upstream option {item[:100]!r}: expected KEY=VALUE")
        options.append((key.strip(), value.strip()))
    if options:  # checked now, not at the first build
        RegistryUpstream.from_config({**dict(options), "url": "http://127.0.0.1"})
    urls = _pairs(registries, "registry", WELL_KNOWN_REGISTRIES)
    creds = _pairs(credentials, "credentials")
    for host, url in urls.items():
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"the upstream of {host} must be an http:// or https:// URL")
    if DOCKER_HUB in creds:
        raise UsageError("credentials for docker.io are not supported yet (its anonymous "
                         "token flow is used)")
    unknown = set(creds) - set(urls)
    if unknown:
        raise UsageError(f"credentials for {', '.join(sorted(unknown))}, which this node does "
                         "not mirror (--upstream REGISTRY=URL)")
    if DOCKER_HUB in urls:
        raise UsageError("docker.io's upstream is the node's --upstream URL")
    return {host: RegistrySource(url, Path(creds[host]) if host in creds else None,
                                 tuple(options))
            for host, url in urls.items()}
