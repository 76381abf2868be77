"""The same envelopes and floods as over HTTP, sent to a real node over QUIC.

Frames that arrive over QUIC go through the same ``PeerService.handle`` as those over
HTTP: forged and stale frames are refused with a reason, a frame is accepted once
whichever transport it comes by, claimed addresses are checked within the same budget
and never polled, and one announcer's provider records are capped.
"""

from __future__ import annotations

import json
import random
import socket
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import httpx
import pytest
from pyrsia_core._wire import open_frame, seal
from pyrsia_core.interfaces import PeerAddress
from pyrsia_registry._p2p import MAX_RECORDS_PER_PROVIDER
from pyrsia_transport_quic import QuicTransport
from support.attack import Tarpit
from support.node import NodeProcess

from pyrsia_core import Ed25519Signer, canonical_json

pytestmark = [pytest.mark.process, pytest.mark.anyio]
EVIL = Ed25519Signer.from_seed(b"q" * 32)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, str]]:
    port = free_udp_port()
    extra = ("--sync-interval", "0.5", "--transport", "http,quic", "--quic-port", str(port))
    with NodeProcess(tmp_path_factory.mktemp("quic-attack"), extra=extra) as n:
        yield n, f"quic://127.0.0.1:{port}"


@pytest.fixture
async def quic(node: tuple[NodeProcess, str]) -> AsyncIterator[object]:
    async with QuicTransport(timeout=5) as transport:
        client = await transport.connect(PeerAddress(node[1]))
        yield client
        await client.aclose()


async def ask(client: object, frame: bytes) -> tuple[str, dict[str, object]]:
    reply = await client.request(frame, timeout=20)  # type: ignore[attr-defined]
    env = open_frame(reply, now=time.time())
    return env.type, dict(env.body)


def frame(type_: str, body: dict[str, object] | None = None, *, signer: Ed25519Signer = EVIL,
          address: str = "http://127.0.0.1:1", now: float | None = None) -> bytes:
    return seal(signer, type_, body or {}, address=address, now=time.time() if now is None else now)


async def test_forged_and_stale_frames_are_refused_over_quic(quic: object) -> None:
    ping = json.loads(frame("PING"))
    forged = {
        "wrong signature": canonical_json({**ping, "sig": "00" * 64}),
        "other sender": canonical_json({**ping, "from": Ed25519Signer.from_seed(b"r" * 32)
                                        .node_id}),
        "stale": frame("PING", now=time.time() - 3600),
        "unknown type": canonical_json({**ping, "type": "EXPLODE"}),
    }
    for name, bad in forged.items():
        type_, body = await ask(quic, bad)
        assert type_ == "ERROR" and body["error"], name
    assert (await ask(quic, frame("PING")))[0] == "PONG"


async def test_a_frame_is_accepted_once_over_either_transport(
    quic: object, node: tuple[NodeProcess, str]
) -> None:
    once = frame("GET_HEAD")
    assert (await ask(quic, once))[0] == "HEAD"
    type_, body = await ask(quic, once)
    assert type_ == "ERROR" and "replayed" in str(body["error"])
    by_http = frame("GET_HEAD")
    async with httpx.AsyncClient() as http:
        reply = await http.post(f"{node[0].url}/p2p/rpc", content=by_http, timeout=30)
    assert open_frame(reply.content, now=time.time()).type == "HEAD"
    type_, body = await ask(quic, by_http)
    assert type_ == "ERROR" and "replayed" in str(body["error"])


async def test_a_ping_flood_over_quic_is_checked_within_budget(
    quic: object, node: tuple[NodeProcess, str]
) -> None:
    pit = Tarpit()
    try:
        for i in range(300):
            address = f"{pit.url}/p{i}" if i % 2 else pit.url
            assert (await ask(quic, frame("PING", signer=Ed25519Signer.generate(),
                                          address=address)))[0] == "PONG"
        await anyio.sleep(4.0)  # every check has timed out; sync rounds went by
        count = pit.requests
        assert count <= 8, count
        await anyio.sleep(1.5)
        assert pit.requests == count
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{node[0].url}/api/peers", timeout=30)).json() == []
    finally:
        pit.stop()


async def test_an_add_provider_flood_over_quic_is_capped_per_announcer(
    quic: object, node: tuple[NodeProcess, str]
) -> None:
    """One key announces 12,800 digests over QUIC: it keeps its newest 10,000 records
    only; the node answers throughout."""
    announcer = Ed25519Signer.generate()
    rng = random.Random(9)
    keys = [rng.randbytes(32).hex() for _ in range(12_800)]
    started = time.monotonic()
    for i in range(0, len(keys), 256):
        type_, _ = await ask(quic, frame("ADD_PROVIDER", {"keys": keys[i : i + 256]},
                                         signer=announcer, address="http://127.0.0.1:2"))
        assert type_ == "OK"
    assert time.monotonic() - started < 30
    assert len(keys) > MAX_RECORDS_PER_PROVIDER

    async def providers(key: str) -> list[object]:
        type_, body = await ask(quic, frame("GET_PROVIDERS", {"key": key},
                                            signer=Ed25519Signer.generate()))
        assert type_ == "PROVIDERS"
        return [p["node_id"] for p in body["providers"]]  # type: ignore[index, union-attr]

    assert announcer.node_id not in await providers(keys[0])  # the oldest went first
    assert announcer.node_id in await providers(keys[-1])
    assert (await ask(quic, frame("PING")))[0] == "PONG"
