"""Which part a crowded swarm fetch asks for next, and from whom (``SwarmFetch._pick``).

A seeder's upload is the scarce link of a swarm: every part should leave it once, and
fetchers should serve each other the rest (``bench/bench_swarm.py`` measures it).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from pyrsia_registry._swarm import PartialBlob, SwarmFetch, _Holder

from pyrsia_core import Digest, PartHasher

PART = 64 * 1024
PARTS = 8


def fetch(tmp_path: Path) -> SwarmFetch:
    data = bytes(range(256)) * (PARTS * PART // 256)
    hasher = PartHasher(PART)
    hasher.update(data)
    parts = hasher.finish(Digest.of(data))
    peers: Any = None  # _pick touches no peer
    return SwarmFetch(peers, parts.blob, parts, PartialBlob(parts, tmp_path / "partial"))


def holder(name: str, have: Collection[int], *, sending: Collection[int] = (),
           others: int = 0) -> _Holder:
    h = _Holder(name, f"http://127.0.0.1:1/{name}", bytearray(i in have for i in range(PARTS)))
    h.sending = bytearray(i in sending for i in range(PARTS))
    h.others, h.polled = others, 1.0
    return h


def test_a_part_a_fetcher_holds_comes_from_that_fetcher(tmp_path: Path) -> None:
    swarm = fetch(tmp_path)
    everything = set(range(PARTS))
    swarm.holders = {"seeder": holder("seeder", everything, others=3),
                     "f1": holder("f1", {2, 5})}
    swarm.partial.have[:] = bytes(1 if i not in (2, 5) else 0 for i in range(PARTS))
    for _ in range(20):
        choice = swarm._pick()
        assert choice is not None
        index, count, source = choice
        assert (count, source.node_id) == (1, "f1") and index in (2, 5)


def test_a_part_only_the_seeder_holds_and_already_sends_elsewhere_waits(tmp_path: Path) -> None:
    swarm = fetch(tmp_path)
    everything = set(range(PARTS))
    swarm.holders = {"seeder": holder("seeder", everything, sending={0, 1, 2}, others=3),
                     "f1": holder("f1", set())}
    for _ in range(50):
        choice = swarm._pick()
        assert choice is not None
        assert choice[0] not in (0, 1, 2)  # those reach another fetcher, and f1 gets them there
    # Once every other part is in, it waits rather than have the seeder send them twice.
    swarm.partial.have[:] = bytes(1 if i > 2 else 0 for i in range(PARTS))
    assert swarm._pick() is None
    # ... until the seeder no longer sends them (that fetch failed, or it ended).
    swarm.holders["seeder"].sending = bytearray(PARTS)
    choice = swarm._pick()
    assert choice is not None and choice[0] in (0, 1, 2) and choice[2].node_id == "seeder"
