"""The streaming package-type contract: what the rim of ``PackageType.build`` accepts.

A build streams large artifacts into an :class:`ArtifactSink` and yields them without
bytes; the rim refuses a claim the sink cannot back (a digest never stored, a wrong
size), so a plugin cannot make the node log bytes it does not hold.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest
from pyrsia_core.errors import DigestMismatch, PluginFailed
from pyrsia_core.interfaces import ArtifactSink, BuiltArtifact, MemorySink, PackageType

from pyrsia_core import Digest

BIG = bytes(range(256)) * 4096  # 1 MiB


async def _chunks(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


class Streaming(PackageType):
    """Yields one streamed artifact and one carried in memory; ``mode`` breaks the claim."""

    name = "streaming"
    record_type = "Streaming"

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode

    def parse_package_id(self, text: str) -> str:
        if not text:
            raise ValueError("empty")
        return text

    def references(self, content: bytes, media_type: str) -> list[tuple[Digest, str]]:
        raise ValueError("no references")

    async def _build_into(
        self, package_id: str, artifact_ids: Sequence[str], sink: ArtifactSink
    ) -> AsyncIterator[BuiltArtifact]:
        digest = Digest.of(BIG)
        if self.mode == "unstored":
            yield BuiltArtifact("big", digest, size=len(BIG))
            return
        expected = Digest.of(b"other") if self.mode == "mismatch" else digest
        info = await sink.store(_chunks(BIG), expected=expected, size=len(BIG))
        size = info.size + 1 if self.mode == "wrong-size" else info.size
        yield BuiltArtifact("big", info.digest, size=size)
        yield BuiltArtifact("small", Digest.of(b"pom"), b"pom", "text/xml")


@pytest.mark.anyio
async def test_streamed_artifacts_come_back_with_their_size_and_in_the_sink() -> None:
    sink = MemorySink()
    built = await Streaming().build("p", sink=sink)
    assert [(b.artifact_id, b.size, b.data is None) for b in built] == [
        ("big", len(BIG), True), ("small", 3, False)]
    assert sink.blobs[Digest.of(BIG)] == BIG
    # Without a sink (tests, tools) every artifact comes back with its bytes.
    plain = await Streaming().build("p")
    assert [b.data for b in plain] == [BIG, b"pom"]


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["unstored", "wrong-size"])
async def test_a_claim_the_sink_cannot_back_fails_the_plugin(mode: str) -> None:
    with pytest.raises(PluginFailed, match="streaming"):
        await Streaming(mode).build("p", sink=MemorySink())


@pytest.mark.anyio
async def test_bytes_that_do_not_match_are_not_stored() -> None:
    sink = MemorySink()
    with pytest.raises(DigestMismatch):
        await Streaming("mismatch").build("p", sink=sink)
    assert not sink.blobs


@pytest.mark.anyio
async def test_a_verified_blob_reads_ranges_and_refuses_bad_ones() -> None:
    sink = MemorySink()
    info = await sink.store(_chunks(BIG), expected=Digest.of(BIG))
    blob = await sink.open(info.digest)
    assert blob is not None and blob.size == len(BIG)
    assert b"".join([c async for c in blob.open(10, 20)]) == BIG[10:30]
    assert await blob.read() == BIG
    from pyrsia_core.errors import UsageError

    with pytest.raises(UsageError):
        blob.open(len(BIG) + 1)
    with pytest.raises(UsageError):
        blob.open(10, len(BIG))
    with pytest.raises(UsageError):
        await blob.read(limit=1024)
