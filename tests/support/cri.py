"""A minimal client of the kubelet's Container Runtime Interface (CRI) image service.

What the kubelet does to pull an image, without ``crictl`` (not packaged): gRPC calls to
``runtime.v1.ImageService`` on containerd's socket, with the few messages of k8s cri-api's
``pkg/apis/runtime/v1/api.proto`` they need encoded by hand (no code generation)::

    message ImageSpec          { string image = 1; map<string, string> annotations = 2; ... }
    message PullImageRequest   { ImageSpec image = 1; AuthConfig auth = 2;
                                 PodSandboxConfig sandbox_config = 3; }
    message PullImageResponse  { string image_ref = 1; }
    message ImageStatusRequest { ImageSpec image = 1; bool verbose = 2; }
    message ImageStatusResponse{ Image image = 1; map<string, string> info = 2; }
    message Image              { string id = 1; repeated string repo_tags = 2;
                                 repeated string repo_digests = 3; uint64 size = 4; ... }
    message RemoveImageRequest { ImageSpec image = 1; }

containerd answers ``PullImage`` with the image id (its config's digest), as the kubelet sees
it; the manifest digest is in ``repo_digests`` (``docker.io/library/alpine@sha256:...``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc

__all__ = ["CriImage", "CriImageService", "decode_fields", "encode_string_field"]

_SERVICE = "/runtime.v1.ImageService/"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2: strings and messages)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_string_field(number: int, value: str) -> bytes:
    return _field(number, value.encode())


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def decode_fields(data: bytes) -> dict[int, list[bytes | int]]:
    """Every field of one protobuf message: number -> values (bytes for wire type 2)."""
    fields: dict[int, list[bytes | int]] = {}
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        value: bytes | int
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = int.from_bytes(data[pos:pos + width], "little"), pos + width
        else:
            raise ValueError(f"wire type {wire} of field {number} is not supported")
        fields.setdefault(number, []).append(value)
    return fields


def _strings(fields: dict[int, list[bytes | int]], number: int) -> list[str]:
    return [v.decode() for v in fields.get(number, []) if isinstance(v, bytes)]


def _image_spec(image: str) -> bytes:
    return _field(1, encode_string_field(1, image))  # <Request>.image = ImageSpec{image}


@dataclass(frozen=True)
class CriImage:
    """An image as ``ImageStatus`` reports it."""

    id: str
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]


class CriImageService:
    """``runtime.v1.ImageService`` on a containerd socket (``unix://``)."""

    def __init__(self, socket: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket}")

    def _call(self, method: str, request: bytes, timeout: float) -> bytes:
        call = self.channel.unary_unary(_SERVICE + method, request_serializer=None,
                                        response_deserializer=None)
        response = call(request, timeout=timeout)
        assert isinstance(response, bytes)
        return response

    def pull(self, image: str, *, timeout: float = 120) -> str:
        """``PullImage``: the image ref containerd answers (the config digest)."""
        reply = decode_fields(self._call("PullImage", _image_spec(image), timeout))
        (ref,) = _strings(reply, 1)
        return ref

    def status(self, image: str, *, timeout: float = 30) -> CriImage | None:
        """``ImageStatus``: ``None`` when containerd does not have the image."""
        reply = decode_fields(self._call("ImageStatus", _image_spec(image), timeout))
        found = [v for v in reply.get(1, []) if isinstance(v, bytes)]
        if not found:
            return None
        fields = decode_fields(found[0])
        (image_id,) = _strings(fields, 1)
        return CriImage(image_id, tuple(_strings(fields, 2)), tuple(_strings(fields, 3)))

    def remove(self, image: str, *, timeout: float = 30) -> None:
        """``RemoveImage``."""
        self._call("RemoveImage", _image_spec(image), timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CriImageService:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
