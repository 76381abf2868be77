"""Pulling an image from a node the way a registry client does, with httpx."""

from __future__ import annotations

import httpx

from .fixtures import SeededUpstream

__all__ = ["MANIFEST_TYPES", "pull"]

MANIFEST_TYPES = ("application/vnd.docker.distribution.manifest.v2+json, "
                  "application/vnd.oci.image.manifest.v1+json")


def pull(url: str, upstream: SeededUpstream, image: str) -> int:
    """GET the manifest of single-platform ``image`` (``repo:tag``) and each of its blobs
    from the node at ``url``; returns the body bytes received."""
    info = upstream.images[image]
    repo, tag = image.split(":")
    total = 0
    with httpx.Client(base_url=url, timeout=60) as client:
        resp = client.get(f"/v2/{repo}/manifests/{tag}", headers={"accept": MANIFEST_TYPES})
        assert resp.status_code == 200, resp.text
        total += len(resp.content)
        for digest in (info.config_digest, *info.layer_digests):
            resp = client.get(f"/v2/{repo}/blobs/{digest}")
            assert resp.status_code == 200, resp.text
            total += len(resp.content)
    return total
