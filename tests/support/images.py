"""Deterministic test images, built offline in pure Python, and pushing them to a registry.

Layouts follow the OCI image-layout spec: ``oci-layout``, ``index.json`` and ``blobs/sha256/``.
Every byte is a function of the seed string (tar entries with mtime 0, uid/gid 0; gzip with
mtime 0 and no file name; layer payloads from ``random.Random(seed).randbytes``), so the same
call gives the same digests on every run.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import random
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx

from .clients import skopeo

__all__ = [
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "MANIFEST_ACCEPT",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER_GZIP",
    "OCI_MANIFEST",
    "STANDARD_IMAGES",
    "BuiltImage",
    "ImageFormat",
    "ImageInfo",
    "ImageSpec",
    "PlatformImage",
    "build_image",
    "canonical_json",
    "fetch_image_info",
    "layout_for",
    "make_image_layout",
    "make_multiarch_layout",
    "parse_platform",
    "push",
    "put_manifest",
    "seed_images",
    "sha256_digest",
    "upload_blob",
    "upload_blob_content",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
EPOCH = "1970-01-01T00:00:00Z"
DEFAULT_LAYER_SIZE = 32 * 1024


class _HasUrl(Protocol):
    @property
    def url(self) -> str: ...


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """The one JSON encoding used for generated manifests and configs (compact, sorted keys)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def parse_platform(spec: str) -> tuple[str, str | None]:
    """``"arm64/v8"`` -> ``("arm64", "v8")``; ``"amd64"`` -> ``("amd64", None)``."""
    arch, _, variant = spec.partition("/")
    return arch, (variant or None)


@dataclass(frozen=True)
class BuiltImage:
    """One single-platform image held in memory: manifest bytes plus every blob it references."""

    manifest: bytes
    config_digest: str
    layer_digests: tuple[str, ...]
    diff_ids: tuple[str, ...]
    blobs: Mapping[str, bytes]
    arch: str
    os: str
    variant: str | None

    @property
    def manifest_digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def platform(self) -> dict[str, str]:
        platform = {"architecture": self.arch, "os": self.os}
        if self.variant:
            platform["variant"] = self.variant
        return platform


def _layer_tar(seed: str, name: str, size: int) -> bytes:
    """An uncompressed tar with a directory, a small text file and ``size`` seeded random bytes."""
    payload = random.Random(f"{seed}:payload").randbytes(size)
    text = f"pyrsia test layer seed={seed}\n".encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:

        def add(path: str, data: bytes | None, mode: int) -> None:
            info = tarfile.TarInfo(path)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = mode
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

        add("pyrsia-test", None, 0o755)
        add(f"pyrsia-test/{name}", None, 0o755)
        add(f"pyrsia-test/{name}/README", text, 0o644)
        add(f"pyrsia-test/{name}/payload.bin", payload, 0o644)
    return buf.getvalue()


def _gzip(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
        gz.write(data)
    return buf.getvalue()


def build_image(
    *,
    seed: str,
    layers: int = 1,
    layer_size: int = DEFAULT_LAYER_SIZE,
    arch: str = "amd64",
    os: str = "linux",
    variant: str | None = None,
) -> BuiltImage:
    """Build one OCI image (manifest, config, ``layers`` gzip layers) entirely in memory.

    Layer ``i`` depends on ``(seed, arch, variant, i)`` only, so images built from one seed for
    different platforms have different layers, as real multi-arch images do.
    """
    if layers < 1:
        raise ValueError("an image needs at least one layer")
    plat = arch if variant is None else f"{arch}-{variant}"
    blobs: dict[str, bytes] = {}
    layer_descs: list[dict[str, Any]] = []
    diff_ids: list[str] = []
    for i in range(layers):
        tar = _layer_tar(f"{seed}:{plat}:{i}", f"{plat}-layer{i}", layer_size)
        gz = _gzip(tar)
        digest = sha256_digest(gz)
        blobs[digest] = gz
        diff_ids.append(sha256_digest(tar))
        layer_descs.append({"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": len(gz)})
    config_obj: dict[str, Any] = {
        "architecture": arch,
        "os": os,
        "created": EPOCH,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "Labels": {"org.pyrsia.test.seed": seed},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": EPOCH, "created_by": f"pyrsia-test {seed} layer {i}"} for i in range(layers)
        ],
    }
    if variant:
        config_obj["variant"] = variant
    config = canonical_json(config_obj)
    config_digest = sha256_digest(config)
    blobs[config_digest] = config
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": layer_descs,
        }
    )
    blobs[sha256_digest(manifest)] = manifest
    return BuiltImage(
        manifest=manifest,
        config_digest=config_digest,
        layer_digests=tuple(d["digest"] for d in layer_descs),
        diff_ids=tuple(diff_ids),
        blobs=blobs,
        arch=arch,
        os=os,
        variant=variant,
    )


def _write_blobs(layout: Path, blobs: Iterable[tuple[str, bytes]]) -> None:
    blob_dir = layout / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    for digest, data in blobs:
        path = blob_dir / digest.removeprefix("sha256:")
        if not path.exists():
            path.write_bytes(data)


def _add_to_index(layout: Path, descriptor: dict[str, Any], tag: str) -> None:
    """Record ``descriptor`` in ``index.json`` under ``tag`` (replacing an older entry)."""
    (layout / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
    index_path = layout / "index.json"
    if index_path.exists():
        index = json.loads(index_path.read_bytes())
    else:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    manifests = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag]
    manifests.append({**descriptor, "annotations": {REF_NAME: tag}})
    index["manifests"] = manifests
    index_path.write_bytes(canonical_json(index))


def make_image_layout(
    dest: Path | str,
    *,
    seed: str,
    layers: int = 1,
    layer_size: int = DEFAULT_LAYER_SIZE,
    arch: str = "amd64",
    os: str = "linux",
    variant: str | None = None,
    tag: str = "latest",
) -> Path:
    """Write (or add to) an OCI image layout at ``dest`` holding one single-platform image.

    The image is tagged ``tag`` in ``index.json`` (``org.opencontainers.image.ref.name``), so
    ``skopeo copy oci:<dest>:<tag> ...`` finds it. Returns ``dest`` as a ``Path``.
    """
    layout = Path(dest)
    image = build_image(
        seed=seed, layers=layers, layer_size=layer_size, arch=arch, os=os, variant=variant
    )
    _write_blobs(layout, image.blobs.items())
    _add_to_index(
        layout,
        {"mediaType": OCI_MANIFEST, "digest": image.manifest_digest, "size": len(image.manifest)},
        tag,
    )
    return layout


def make_multiarch_layout(
    dest: Path | str,
    *,
    seed: str,
    archs: Iterable[str] = ("amd64", "arm64"),
    layers: int = 1,
    layer_size: int = DEFAULT_LAYER_SIZE,
    os: str = "linux",
    tag: str = "latest",
) -> Path:
    """Write (or add to) an OCI layout whose ``tag`` names an OCI image index.

    ``archs`` entries are ``"arch"`` or ``"arch/variant"`` (``"arm/v7"``). The index lists one
    manifest per platform, each with a ``platform`` field. Returns ``dest`` as a ``Path``.
    """
    layout = Path(dest)
    descriptors: list[dict[str, Any]] = []
    for spec in archs:
        arch, variant = parse_platform(spec)
        image = build_image(
            seed=seed, layers=layers, layer_size=layer_size, arch=arch, os=os, variant=variant
        )
        _write_blobs(layout, image.blobs.items())
        descriptors.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": image.manifest_digest,
                "size": len(image.manifest),
                "platform": image.platform,
            }
        )
    if not descriptors:
        raise ValueError("a multi-arch image needs at least one platform")
    index = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors})
    _write_blobs(layout, [(sha256_digest(index), index)])
    _add_to_index(
        layout, {"mediaType": OCI_INDEX, "digest": sha256_digest(index), "size": len(index)}, tag
    )
    return layout


# -- pushing and reading back ----------------------------------------------------------------

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST])
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
ImageFormat = Literal["oci", "v2s2"]


def _registry_host(registry: str | _HasUrl) -> tuple[str, str]:
    """``(base url, host:port)`` for a registry object with ``.url`` or a URL string."""
    url = registry if isinstance(registry, str) else registry.url
    parsed = httpx.URL(url)
    if parsed.host not in ("127.0.0.1", "localhost"):
        raise ValueError(f"test images are only pushed to loopback registries, not {url!r}")
    return url.rstrip("/"), f"{parsed.host}:{parsed.port}"


def push(
    layout: Path | str,
    registry: str | _HasUrl,
    repo: str,
    tag: str,
    *,
    format: ImageFormat = "oci",
    all_platforms: bool = True,
    src_tag: str | None = None,
    timeout: float = 120.0,
) -> None:
    """``skopeo copy oci:<layout>:<src_tag> docker://127.0.0.1:PORT/<repo>:<tag>``.

    ``format="v2s2"`` converts to Docker schema 2 (an OCI index becomes a Docker manifest list,
    which skopeo 1.9.3 does with ``--all``); ``"oci"`` keeps OCI media types. With
    ``all_platforms`` (``--all``) every platform of an index is copied, without it only the
    host's. ``src_tag`` defaults to ``tag``.
    """
    _, host = _registry_host(registry)
    argv = ["copy", "--dest-tls-verify=false", "--format", "v2s2" if format == "v2s2" else "oci"]
    if all_platforms:
        argv.append("--all")
    argv += [f"oci:{Path(layout)}:{src_tag or tag}", f"docker://{host}/{repo}:{tag}"]
    skopeo(*argv, timeout=timeout)


@dataclass(frozen=True)
class PlatformImage:
    """One single-platform manifest as the registry serves it."""

    platform: str  # "linux/amd64", "linux/arm64/v8"
    manifest_digest: str
    media_type: str
    manifest: bytes
    config_digest: str
    layer_digests: tuple[str, ...]

    @property
    def blob_digests(self) -> tuple[str, ...]:
        return (self.config_digest, *self.layer_digests)


@dataclass(frozen=True)
class ImageInfo:
    """What the registry reports for ``repo:tag`` (digests of the exact bytes it serves).

    For a single-platform image ``platforms`` has one entry and ``config_digest`` /
    ``layer_digests`` are its own; for an index (manifest list or OCI index) ``platforms`` has
    one entry per platform, ``config_digest`` is ``None`` and ``layer_digests`` is empty.
    """

    repo: str
    tag: str
    manifest_digest: str
    media_type: str
    manifest: bytes
    platforms: Mapping[str, PlatformImage]
    config_digest: str | None
    layer_digests: tuple[str, ...]

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def reference(self) -> str:
        """``repo:tag``."""
        return f"{self.repo}:{self.tag}"

    @property
    def platform_manifest_digests(self) -> dict[str, str]:
        """``{"linux/amd64": "sha256:...", ...}``."""
        return {p: img.manifest_digest for p, img in self.platforms.items()}

    @property
    def blob_digests(self) -> tuple[str, ...]:
        """Every config and layer digest of every platform (no duplicates, stable order)."""
        seen: dict[str, None] = {}
        for img in self.platforms.values():
            for d in img.blob_digests:
                seen.setdefault(d, None)
        return tuple(seen)

    @property
    def artifact_digests(self) -> tuple[str, ...]:
        """The top manifest, every platform manifest, config and layer (no duplicates)."""
        seen: dict[str, None] = {self.manifest_digest: None}
        for img in self.platforms.values():
            for d in (img.manifest_digest, *img.blob_digests):
                seen.setdefault(d, None)
        return tuple(seen)


def _get_manifest(client: httpx.Client, base: str, repo: str, ref: str) -> tuple[bytes, str, str]:
    resp = client.get(f"{base}/v2/{repo}/manifests/{ref}", headers={"Accept": MANIFEST_ACCEPT})
    resp.raise_for_status()
    body = resp.content
    digest = sha256_digest(body)
    reported = resp.headers.get("Docker-Content-Digest")
    if reported is not None and reported != digest:
        raise AssertionError(f"{repo}@{ref}: registry says {reported}, bytes hash to {digest}")
    media_type = resp.headers["Content-Type"].split(";")[0].strip()
    return body, digest, media_type


def _platform_image(
    client: httpx.Client, base: str, repo: str, body: bytes, digest: str, media_type: str
) -> PlatformImage:
    manifest = json.loads(body)
    config_digest = manifest["config"]["digest"]
    resp = client.get(f"{base}/v2/{repo}/blobs/{config_digest}")
    resp.raise_for_status()
    config = json.loads(resp.content)
    parts = [config.get("os", ""), config.get("architecture", "")]
    if config.get("variant"):
        parts.append(config["variant"])
    return PlatformImage(
        platform="/".join(parts),
        manifest_digest=digest,
        media_type=media_type,
        manifest=body,
        config_digest=config_digest,
        layer_digests=tuple(layer["digest"] for layer in manifest["layers"]),
    )


def fetch_image_info(registry: str | _HasUrl, repo: str, tag: str) -> ImageInfo:
    """Read ``repo:tag`` back from the registry (manifests, per-platform manifests, configs)."""
    base, _ = _registry_host(registry)
    with httpx.Client(timeout=30.0, trust_env=False) as client:
        body, digest, media_type = _get_manifest(client, base, repo, tag)
        platforms: dict[str, PlatformImage] = {}
        if media_type in INDEX_TYPES:
            for desc in json.loads(body)["manifests"]:
                sub, sub_digest, sub_type = _get_manifest(client, base, repo, desc["digest"])
                img = _platform_image(client, base, repo, sub, sub_digest, sub_type)
                platforms[img.platform] = img
            return ImageInfo(repo, tag, digest, media_type, body, platforms, None, ())
        img = _platform_image(client, base, repo, body, digest, media_type)
        platforms[img.platform] = img
        return ImageInfo(
            repo, tag, digest, media_type, body, platforms, img.config_digest, img.layer_digests
        )


@dataclass(frozen=True)
class ImageSpec:
    """How :func:`seed_images` builds and pushes one image."""

    repo: str
    tag: str
    format: ImageFormat
    seed: str
    archs: tuple[str, ...] | None = None  # None: single-platform amd64 image
    layers: int = 1
    layer_size: int = 16 * 1024

    @property
    def reference(self) -> str:
        return f"{self.repo}:{self.tag}"


STANDARD_IMAGES: tuple[ImageSpec, ...] = (
    ImageSpec("library/alpine", "3.16.2", "v2s2", seed="alpine-3.16.2"),
    ImageSpec("library/multi", "1.0", "v2s2", seed="multi-1.0", archs=("amd64", "arm64/v8")),
    ImageSpec("library/ocimulti", "1.0", "oci", seed="ocimulti-1.0", archs=("amd64", "arm64/v8")),
    ImageSpec("library/ociimage", "1.0", "oci", seed="ociimage-1.0", layers=2),
    ImageSpec("some/nested/repo", "v1", "v2s2", seed="some-nested-repo-v1"),
)


def layout_for(spec: ImageSpec, dest: Path | str) -> Path:
    """Build the OCI layout for ``spec`` at ``dest`` (tagged ``spec.tag``)."""
    if spec.archs is None:
        return make_image_layout(
            dest, seed=spec.seed, layers=spec.layers, layer_size=spec.layer_size, tag=spec.tag
        )
    return make_multiarch_layout(
        dest,
        seed=spec.seed,
        archs=spec.archs,
        layers=spec.layers,
        layer_size=spec.layer_size,
        tag=spec.tag,
    )


def seed_images(
    registry: str | _HasUrl,
    specs: Iterable[ImageSpec] = STANDARD_IMAGES,
    *,
    workdir: Path | str | None = None,
) -> dict[str, ImageInfo]:
    """Build, push and read back ``specs`` (default :data:`STANDARD_IMAGES`).

    Returns ``{"library/alpine:3.16.2": ImageInfo, ...}`` with the digests the registry
    reports. The pushes run in parallel (one skopeo each).
    """
    specs = tuple(specs)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="pyrsia-layouts-"))
        root = Path(workdir)

        def one(i: int, spec: ImageSpec) -> None:
            layout = layout_for(spec, root / f"layout-{i}")
            push(layout, registry, spec.repo, spec.tag, format=spec.format, all_platforms=True)

        with ThreadPoolExecutor(max_workers=len(specs) or 1) as pool:
            for fut in [pool.submit(one, i, s) for i, s in enumerate(specs)]:
                fut.result()
    return {s.reference: fetch_image_info(registry, s.repo, s.tag) for s in specs}


# -- raw push API (for hand-made or deliberately odd content) -------------------------------


def upload_blob(registry: str | _HasUrl, repo: str, data: bytes) -> str:
    """Monolithic blob upload (``POST`` then ``PUT ?digest=``); returns the digest."""
    base, _ = _registry_host(registry)
    digest = sha256_digest(data)
    with httpx.Client(timeout=30.0, trust_env=False) as client:
        upload_blob_content(client, base, repo, digest, data)
    return digest


def upload_blob_content(client: httpx.Client, base: str, repo: str, digest: str,
                        content: bytes | Iterable[bytes], size: int | None = None) -> None:
    """Monolithic upload of ``digest`` (``POST`` then ``PUT ?digest=``): ``content`` as
    bytes, or streamed (then ``size`` is its Content-Length)."""
    resp = client.post(f"{base}/v2/{repo}/blobs/uploads/")
    if resp.status_code != 202:
        raise RuntimeError(f"upload start for {repo}: {resp.status_code} {resp.text}")
    location = httpx.URL(base).join(resp.headers["Location"])
    headers = {"Content-Type": "application/octet-stream"}
    if size is not None:
        headers["Content-Length"] = str(size)
    resp = client.put(location.copy_merge_params({"digest": digest}), content=content,
                      headers=headers)
    if resp.status_code != 201:
        raise RuntimeError(f"upload of {digest} to {repo}: {resp.status_code} {resp.text}")


def put_manifest(
    registry: str | _HasUrl, repo: str, reference: str, body: bytes, media_type: str
) -> str:
    """``PUT /v2/<repo>/manifests/<reference>`` with the exact ``body``; returns its digest."""
    base, _ = _registry_host(registry)
    with httpx.Client(timeout=30.0, trust_env=False) as client:
        resp = client.put(
            f"{base}/v2/{repo}/manifests/{reference}",
            content=body,
            headers={"Content-Type": media_type},
        )
    if resp.status_code != 201:
        raise RuntimeError(f"manifest PUT {repo}:{reference}: {resp.status_code} {resp.text}")
    digest = sha256_digest(body)
    reported = resp.headers.get("Docker-Content-Digest")
    if reported is not None and reported != digest:
        raise AssertionError(f"registry says {reported}, bytes hash to {digest}")
    return digest
