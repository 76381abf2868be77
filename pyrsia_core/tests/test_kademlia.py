"""Unit and property tests for Kademlia routing (``pyrsia_core._kademlia``).

The reference for every ordering is a brute-force sort by ``int(a) ^ int(b)``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyrsia_core.kademlia import (
    QUERY_TRANSITIONS,
    Contact,
    Lookup,
    ProviderStore,
    QueryState,
    RoutingTable,
    xor_distance,
)

from pyrsia_core import node_id_of

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def nid(i: int) -> bytes:
    return i.to_bytes(32, "big")


def contact(i: int | bytes) -> Contact:
    raw = nid(i) if isinstance(i, int) else i
    return Contact(raw, f"http://10.0.0.1/{raw.hex()[-8:]}")


def dist(a: bytes, b: bytes) -> int:
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def brute_closest(contacts: Sequence[Contact], key: bytes, n: int) -> list[Contact]:
    return sorted(contacts, key=lambda c: dist(c.node_id, key))[:n]


ids32 = st.binary(min_size=32, max_size=32)


@st.composite
def near(draw: st.DrawFn, base: bytes) -> bytes:
    """An id at a random bucket distance from ``base`` (so low buckets get exercised)."""
    bits = draw(st.integers(0, 255))
    low = draw(st.integers(0, (1 << bits) - 1)) if bits else 0
    return (int.from_bytes(base, "big") ^ ((1 << bits) | low)).to_bytes(32, "big")


# --------------------------------------------------------------------------- Contact


def test_contact_validates_its_fields() -> None:
    for bad in (b"", b"\x00" * 31, b"\x00" * 33, bytearray(32), "00" * 32, None):
        with pytest.raises(ValueError):
            Contact(bad, "http://x")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Contact(nid(1), b"http://x")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Contact(nid(1), "x" * 5000)


def test_contact_is_a_frozen_value() -> None:
    a, b = Contact(nid(7), "a"), Contact(nid(7), "a")
    assert a == b and hash(a) == hash(b) and a.id_int == 7
    assert Contact(nid(7), "b") != a
    with pytest.raises(AttributeError):
        a.address = "z"  # type: ignore[misc]
    assert "Contact(" in repr(a) and a.hex == nid(7).hex()


def test_contact_from_hex_matches_node_id_of() -> None:
    public_key = bytes(range(32))
    node_hex = node_id_of(public_key)
    c = Contact.from_hex(node_hex, "http://127.0.0.1:1")
    assert c.node_id == hashlib.sha256(public_key).digest()
    for bad in ("00" * 31, "zz" * 32, "AB"):
        with pytest.raises(ValueError):
            Contact.from_hex(bad, "x")


@given(ids32, ids32, ids32)
def test_xor_distance_is_a_metric(a: bytes, b: bytes, c: bytes) -> None:
    assert xor_distance(a, a) == 0
    assert xor_distance(a, b) == xor_distance(b, a) == dist(a, b)
    assert (xor_distance(a, b) == 0) == (a == b)
    assert xor_distance(a, c) <= xor_distance(a, b) + xor_distance(b, c)


def test_xor_distance_rejects_bad_ids() -> None:
    with pytest.raises(ValueError):
        xor_distance(b"\x00" * 31, b"\x00" * 32)
    with pytest.raises(ValueError):
        xor_distance(b"\x00" * 32, "x" * 32)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- RoutingTable


def test_routing_table_rejects_bad_arguments() -> None:
    for bad_k in (0, -1, 1.5, True, "3"):
        with pytest.raises(ValueError):
            RoutingTable(nid(0), bad_k)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RoutingTable(b"short")
    table = RoutingTable(nid(0), 3)
    with pytest.raises(ValueError):
        table.closest(b"short")
    with pytest.raises(ValueError):
        table.closest(nid(1), -1)
    with pytest.raises(ValueError):
        table.update(nid(1), 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        table.update(contact(1), float("nan"))
    with pytest.raises(ValueError):
        table.bucket(256)
    with pytest.raises(ValueError):
        table.remove(b"x")


def test_bucket_index_is_the_distance_bit_length_minus_one() -> None:
    table = RoutingTable(nid(0))
    assert table.bucket_index(nid(0)) == -1
    assert table.bucket_index(nid(1)) == 0
    assert table.bucket_index(nid(2)) == table.bucket_index(nid(3)) == 1
    assert table.bucket_index(b"\x80" + b"\x00" * 31) == 255
    assert table.update(contact(0), 0.0) is False  # never ourselves
    assert len(table) == 0


@SETTINGS
@given(st.data())
def test_closest_equals_brute_force_sort(data: st.DataObject) -> None:
    own = data.draw(ids32)
    k = data.draw(st.integers(1, 6))
    ids = data.draw(st.lists(st.one_of(near(own), ids32), max_size=120, unique=True))
    table = RoutingTable(own, k)
    for t, i in enumerate(ids):
        table.update(contact(i), float(t))
    members = table.contacts()
    assert len(members) == len(table) == len({c.node_id for c in members})
    key = data.draw(st.one_of(near(own), ids32, st.just(own)))
    n = data.draw(st.integers(0, 40))
    exclude = data.draw(st.lists(st.sampled_from(ids), max_size=5)) if ids else []
    expected = brute_closest([c for c in members if c.node_id not in exclude], key, n)
    assert table.closest(key, n, exclude=exclude) == expected
    assert table.closest(key) == brute_closest(members, key, k)


@SETTINGS
@given(st.data())
def test_buckets_never_exceed_k_and_hold_the_right_contacts(data: st.DataObject) -> None:
    own = data.draw(ids32)
    k = data.draw(st.integers(1, 4))
    table = RoutingTable(own, k)
    ops = data.draw(
        st.lists(
            st.tuples(st.sampled_from(["update", "remove", "ping"]), near(own), st.booleans()),
            max_size=150,
        )
    )
    for t, (op, i, alive) in enumerate(ops):
        if op == "update":
            table.update(contact(i), float(t))
        elif op == "remove":
            table.remove(i)
        else:
            for candidate in table.take_ping_candidates():
                table.evict_or_keep(candidate, alive, float(t))
        total = 0
        for index in range(256):
            bucket = table.bucket(index)
            assert len(bucket) <= k
            assert len(table.replacements(index)) <= k
            assert all(table.bucket_index(c.node_id) == index for c in bucket)
            seen = [table.last_seen(c.node_id) or 0.0 for c in bucket]
            assert seen == sorted(seen)  # least recently seen first
            total += len(bucket)
        assert total == len(table)
        assert len(table.pending_pings) <= sum(1 for i in range(256) if table.bucket(i))


def _far(i: int) -> Contact:
    """Contacts in bucket 255 of a table whose own id is 0."""
    return contact((1 << 255) | i)


def test_full_bucket_yields_a_ping_candidate_instead_of_evicting() -> None:
    table = RoutingTable(nid(0), k=3)
    a, b, c, d, e = (_far(i) for i in range(5))
    for t, x in enumerate((a, b, c)):
        assert table.update(x, float(t)) is True
    assert table.take_ping_candidates() == []
    # A newcomer finds the bucket full: it is not added, the LRU contact is to be pinged.
    assert table.update(d, 10.0) is False
    assert d.node_id not in table and table.bucket(255) == [a, b, c]
    assert table.take_ping_candidates() == [a]
    assert table.take_ping_candidates() == []  # drained
    assert table.pending_pings == [a]
    # One ping per bucket at a time: the next newcomer only joins the replacement cache.
    assert table.update(e, 11.0) is False
    assert table.take_ping_candidates() == []
    assert table.replacements(255) == [d, e]
    # a answered: it stays, now most recently seen; nobody is added.
    assert table.evict_or_keep(a, True, 12.0) is None
    assert table.bucket(255) == [b, c, a] and table.last_seen(a.node_id) == 12.0
    assert table.pending_pings == []
    # The next newcomer makes b (now the LRU) the candidate; b times out: evicted, and
    # the freshest replacement takes its place.
    assert table.update(d, 13.0) is False
    assert table.take_ping_candidates() == [b]
    assert table.evict_or_keep(b, False, 14.0) == d
    assert b.node_id not in table and d.node_id in table
    assert table.bucket(255) == [c, a, d]
    assert table.replacements(255) == [e]
    # A stale report about a contact no longer in the table changes nothing.
    assert table.evict_or_keep(b, False, 15.0) is None
    assert len(table) == 3


def test_hearing_from_the_ping_candidate_settles_the_ping() -> None:
    table = RoutingTable(nid(0), k=2)
    a, b, c = _far(1), _far(2), _far(3)
    table.update(a, 0.0)
    table.update(b, 1.0)
    assert table.update(c, 2.0) is False
    assert table.pending_pings == [a]
    assert table.update(a, 3.0) is True  # a message from a: it is alive
    assert table.pending_pings == [] and table.take_ping_candidates() == []
    assert table.bucket(255) == [b, a]


def test_update_refreshes_lru_order_and_address() -> None:
    table = RoutingTable(nid(0), k=3)
    a, b = _far(1), _far(2)
    table.update(a, 0.0)
    table.update(b, 1.0)
    moved = Contact(a.node_id, "http://new")
    assert table.update(moved, 2.0) is True
    assert table.bucket(255) == [b, moved]
    assert table.get(a.node_id) == moved and table.last_seen(a.node_id) == 2.0


def test_remove_promotes_the_freshest_replacement() -> None:
    table = RoutingTable(nid(0), k=2)
    a, b, c, d = (_far(i) for i in range(4))
    table.update(a, 0.0)
    table.update(b, 1.0)
    table.update(c, 2.0)
    table.update(d, 3.0)
    assert table.remove(b.node_id) is True
    assert table.bucket(255) == [a, d]
    assert table.remove(b.node_id) is False
    assert table.last_seen(b.node_id) is None
    # Removing the pending candidate settles its ping as well.
    assert table.pending_pings == [a]
    assert table.remove(a.node_id) is True
    assert table.pending_pings == [] and table.take_ping_candidates() == []
    assert table.bucket(255) == [c, d]  # c (seen at 2.0) sorts before d (3.0)


def test_stale_buckets_and_refresh_targets() -> None:
    own = hashlib.sha256(b"own").digest()
    table = RoutingTable(own, k=5)
    assert table.stale_buckets(0.0, 3600.0) == []
    rng = random.Random(1)
    for index in (250, 253, 255):
        target = table.refresh_target(index, rng)
        assert table.bucket_index(target) == index
        table.update(Contact(target, "x"), 0.0)
    assert table.refresh_target(0, rng) == (int.from_bytes(own, "big") ^ 1).to_bytes(32, "big")
    assert table.stale_buckets(0.0, 3600.0) == list(range(250, 256))
    table.mark_refreshed(table.refresh_target(253, rng), 100.0)
    table.mark_refreshed(own, 100.0)  # a self-lookup: no bucket
    assert table.stale_buckets(200.0, 3600.0) == [250, 251, 252, 254, 255]
    assert 253 in table.stale_buckets(3700.0, 3600.0)


def test_copy_is_independent() -> None:
    table = RoutingTable(nid(0), k=2)
    for i in range(1, 6):
        table.update(contact(i), float(i))
    other = table.copy()
    assert other.contacts() == table.contacts()
    other.remove(nid(1))
    other.update(contact(99), 9.0)
    assert nid(1) in table and nid(99) not in table
    assert other.take_ping_candidates() == table.take_ping_candidates()


# --------------------------------------------------------------------------- Lookup


def test_lookup_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Lookup(b"short", [])
    with pytest.raises(ValueError):
        Lookup(nid(1), [], "values")  # type: ignore[arg-type]
    for kw in ({"alpha": 0}, {"k": 0}, {"want_providers": 0}, {"own_id": b"x"}):
        with pytest.raises(ValueError):
            Lookup(nid(1), [], **kw)
    with pytest.raises(ValueError):
        Lookup(nid(1), [nid(2)])  # type: ignore[list-item]


def test_lookup_with_no_seeds_is_done_at_once() -> None:
    lookup = Lookup(nid(1), [])
    assert lookup.done and lookup.next_queries() == [] and lookup.result() == []


def test_transition_table_is_closed_and_immutable() -> None:
    assert QUERY_TRANSITIONS[(QueryState.IN_FLIGHT, "response")] is QueryState.ANSWERED
    assert (QueryState.ANSWERED, "response") not in QUERY_TRANSITIONS
    with pytest.raises(TypeError):
        QUERY_TRANSITIONS[(QueryState.ANSWERED, "response")] = QueryState.ANSWERED  # type: ignore[index]


def test_illegal_transitions_raise_and_late_answers_are_ignored() -> None:
    a, b = contact(1), contact(2)
    lookup = Lookup(nid(0), [a, b], alpha=1, k=2)
    with pytest.raises(ValueError, match="illegal"):
        lookup.on_response(a, [])  # not asked yet
    with pytest.raises(ValueError, match="not part"):
        lookup.on_response(contact(9), [])
    assert lookup.next_queries() == [a]
    assert lookup.next_queries() == []  # alpha = 1
    lookup.on_response(a, [])
    with pytest.raises(ValueError, match="illegal"):
        lookup.on_response(a, [])  # answered twice
    assert lookup.next_queries() == [b]
    lookup.on_failure(b)
    lookup.on_response(b, [contact(3)])  # a late answer after the timeout: ignored
    assert lookup.state_of(b.node_id) is QueryState.FAILED
    assert lookup.state_of(nid(3)) is None
    assert lookup.done and lookup.result() == [a] and lookup.failures == 1


def test_lookup_skips_own_id_and_caps_closer_lists() -> None:
    me = contact(5)
    lookup = Lookup(nid(0), [me, contact(6)], k=3, own_id=me.node_id)
    assert lookup.next_queries() == [contact(6)]
    lookup.on_response(contact(6), [me, *(contact(i) for i in range(100, 200))])
    assert lookup.state_of(me.node_id) is None
    # Only the first k of a reply are read (and we are one of them here).
    assert lookup.state_of(nid(102)) is None
    assert lookup.next_queries() == [contact(100), contact(101)]


def test_hops_count_sequential_round_trips() -> None:
    # A chain: each node knows only the next one, nearer the target.
    chain = [contact(1 << i) for i in range(8, 0, -1)]
    lookup = Lookup(nid(0), [chain[0]], k=1)
    for i, c in enumerate(chain):
        assert lookup.next_queries() == [c]
        lookup.on_response(c, chain[i + 1 : i + 2])
    assert lookup.done and lookup.hops == len(chain) and lookup.queries == len(chain)
    assert lookup.result() == [chain[-1]]


def test_provider_lookup_stops_when_enough_providers_are_found() -> None:
    p1, p2 = contact(1000), contact(1001)
    seeds = [contact(i) for i in range(1, 10)]
    lookup = Lookup(nid(0), seeds, "providers", alpha=3, k=5, want_providers=2)
    first = lookup.next_queries()
    lookup.on_response(first[0], [], [p1])
    assert not lookup.done
    lookup.on_response(first[1], [], [p1, p2])
    assert lookup.done and lookup.providers() == [p1, p2]
    assert lookup.next_queries() == []
    lookup.on_response(first[2], [], [contact(1002)])  # still accepted after done
    assert lookup.done and len(lookup.providers()) == 3


class World:
    """Nodes that each know a subset of the others and answer with their k closest."""

    def __init__(self, ids: Sequence[bytes], knows: dict[bytes, list[bytes]], failed: set[bytes]):
        self.contacts = {i: contact(i) for i in ids}
        self.knows = knows
        self.failed = failed

    def answer(self, who: bytes, target: bytes, k: int) -> list[Contact]:
        known = [self.contacts[i] for i in self.knows[who]]
        return brute_closest(known, target, k)


def drive(
    lookup: Lookup, world: World, pick: Callable[[int], int], max_steps: int = 10_000
) -> list[bytes]:
    """Run a lookup to completion, checking its invariants; returns the query order."""
    asked: list[bytes] = []
    in_flight: list[Contact] = []
    for _ in range(max_steps):
        for c in lookup.next_queries():
            assert c.node_id not in asked, "queried twice"
            asked.append(c.node_id)
            in_flight.append(c)
        assert len(in_flight) == lookup.in_flight <= lookup.alpha
        if lookup.done:
            break
        assert in_flight, "stuck: not done and nothing in flight"
        c = in_flight.pop(pick(len(in_flight)))
        if c.node_id in world.failed:
            lookup.on_failure(c)
        else:
            lookup.on_response(c, world.answer(c.node_id, lookup.target, lookup.k))
    else:
        raise AssertionError("lookup did not terminate")
    assert lookup.queries == len(asked)
    return asked


@SETTINGS
@given(st.data())
def test_lookup_invariants_under_random_order_and_failures(data: st.DataObject) -> None:
    ids = data.draw(st.lists(ids32, min_size=1, max_size=60, unique=True))
    k = data.draw(st.integers(1, 8))
    alpha = data.draw(st.integers(1, 4))
    failed = set(data.draw(st.lists(st.sampled_from(ids), max_size=len(ids) // 2)))
    knows = {i: data.draw(st.lists(st.sampled_from(ids), max_size=20, unique=True)) for i in ids}
    world = World(ids, knows, failed)
    target = data.draw(ids32)
    seeds = [world.contacts[i] for i in data.draw(st.lists(st.sampled_from(ids), max_size=k))]
    lookup = Lookup(target, seeds, alpha=alpha, k=k)
    asked = drive(lookup, world, lambda n: data.draw(st.integers(0, n - 1)))
    result = lookup.result()
    assert all(c.node_id not in failed for c in result)
    assert all(lookup.state_of(c.node_id) is QueryState.ANSWERED for c in result)
    assert result == brute_closest(result, target, k)
    assert len(result) <= k and set(c.node_id for c in result) <= set(asked)
    # Failures count the ones reported; a lookup can finish while a query to a failed
    # contact is still in flight (its failure never arrives).
    reported = {a for a in set(asked) & failed if lookup.state_of(a) is not QueryState.IN_FLIGHT}
    assert lookup.failures == len(reported)
    # Done means: the k closest known non-failed contacts have all answered.
    known = [world.contacts[i] for i in ids if lookup.state_of(i) is not None]
    live_known = brute_closest([c for c in known if c.node_id not in failed], target, k)
    assert result == live_known


@SETTINGS
@given(st.data())
def test_lookup_with_full_knowledge_finds_the_true_k_closest(data: st.DataObject) -> None:
    ids = data.draw(st.lists(ids32, min_size=2, max_size=80, unique=True))
    k = data.draw(st.integers(1, 10))
    world = World(ids, {i: list(ids) for i in ids}, set())
    target = data.draw(ids32)
    lookup = Lookup(target, [world.contacts[ids[0]]], alpha=data.draw(st.integers(1, 5)), k=k)
    drive(lookup, world, lambda n: data.draw(st.integers(0, n - 1)))
    assert lookup.result() == brute_closest(list(world.contacts.values()), target, k)


def test_lookup_only_asks_among_the_k_closest_non_failed() -> None:
    # Target 0; seeds at distances 1..6; k = 2: only the two nearest non-failed are asked.
    seeds = [contact(i) for i in range(1, 7)]
    lookup = Lookup(nid(0), seeds, alpha=3, k=2)
    assert lookup.next_queries() == [contact(1), contact(2)]
    lookup.on_failure(contact(1))
    assert lookup.next_queries() == [contact(3)]
    lookup.on_response(contact(2), [])
    lookup.on_response(contact(3), [])
    assert lookup.done and lookup.result() == [contact(2), contact(3)]
    assert lookup.state_of(nid(4)) is QueryState.WAITING


# --------------------------------------------------------------------------- ProviderStore


KEY = hashlib.sha256(b"artifact").digest()


def test_provider_store_rejects_bad_arguments() -> None:
    for kw in ({"ttl": 0}, {"ttl": -1.0}, {"ttl": 10, "max_per_key": 0}, {"ttl": 1, "max_keys": 0}):
        with pytest.raises(ValueError):
            ProviderStore(**kw)
    store = ProviderStore(10.0)
    with pytest.raises(ValueError):
        store.add(b"short", contact(1), 0.0)
    with pytest.raises(ValueError):
        store.add(KEY, nid(1), 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.get(KEY[:31], 0.0)
    with pytest.raises(ValueError):
        store.due_for_republish(0.0, b"x", 1.0)


def test_provider_records_expire() -> None:
    store = ProviderStore(ttl=100.0)
    a, b = contact(1), contact(2)
    assert store.add(KEY, a, 0.0)
    assert store.add(KEY, b, 50.0, expires=60.0)
    assert store.get(KEY, 10.0) == [a, b]  # longest-lived first
    assert store.get(KEY, 60.0) == [a]  # b expired at 60
    assert store.get(KEY, 100.0) == []
    assert store.keys() == []
    # A peer cannot ask for more than ttl; an already expired record is refused.
    assert store.add(KEY, a, 200.0, expires=10_000.0)
    assert store.get(KEY, 299.0) == [a] and store.get(KEY, 300.0) == []
    assert store.add(KEY, a, 400.0, expires=400.0) is False
    # Re-adding refreshes.
    store.add(KEY, a, 500.0)
    store.add(KEY, a, 550.0)
    assert store.get(KEY, 620.0) == [a]


def test_expire_drops_everything_expired() -> None:
    store = ProviderStore(ttl=10.0)
    other = hashlib.sha256(b"other").digest()
    store.add(KEY, contact(1), 0.0)
    store.add(KEY, contact(2), 5.0)
    store.add(other, contact(3), 0.0)
    assert len(store) == 3
    assert store.expire(10.0) == 2
    assert len(store) == 1 and store.keys() == [KEY]
    assert store.expire(100.0) == 1 and store.keys() == []


def test_max_per_key_keeps_the_longest_lived() -> None:
    store = ProviderStore(ttl=100.0, max_per_key=2)
    a, b, c = contact(1), contact(2), contact(3)
    store.add(KEY, a, 0.0)
    store.add(KEY, b, 10.0)
    assert store.add(KEY, c, 20.0) is True  # a expires first: dropped
    assert set(store.get(KEY, 20.0)) == {b, c}
    assert store.add(KEY, a, 20.0, expires=50.0) is False  # would expire before both
    assert store.add(KEY, b, 30.0) is True  # refreshing a present provider always works


def test_max_keys_caps_the_store() -> None:
    store = ProviderStore(ttl=10.0, max_keys=2)
    keys = [hashlib.sha256(bytes([i])).digest() for i in range(3)]
    assert store.add(keys[0], contact(1), 0.0)
    assert store.add(keys[1], contact(1), 5.0)
    assert store.add(keys[2], contact(1), 6.0) is False
    assert store.add(keys[2], contact(1), 10.0) is True  # keys[0] expired meanwhile


def test_due_for_republish() -> None:
    me = contact(42)
    store = ProviderStore(ttl=48 * 3600.0)
    other = hashlib.sha256(b"other").digest()
    third = hashlib.sha256(b"third").digest()
    store.provide(KEY)
    assert store.due_for_republish(0.0, me.node_id, 3600.0) == [KEY]  # never published
    store.mark_published(KEY, 0.0)
    assert store.due_for_republish(100.0, me.node_id, 3600.0) == []
    assert store.due_for_republish(3600.0, me.node_id, 3600.0) == [KEY]
    # A record naming us counts as an own key, published when it was stored...
    store.add(other, me, 1000.0)
    store.add(third, contact(7), 0.0)  # ...a record of someone else does not.
    assert store.due_for_republish(4600.0, me.node_id, 3600.0) == [KEY, other]
    store.mark_published(other, 5000.0)
    assert store.due_for_republish(5000.0, me.node_id, 3600.0) == [KEY]
    store.unprovide(KEY)
    assert store.provided() == [other]
    assert store.due_for_republish(9000.0, me.node_id, 3600.0) == [other]


def test_records_per_provider_are_capped_oldest_first() -> None:
    """One announcing node holds at most max_per_provider records; its oldest make room."""
    store = ProviderStore(ttl=100.0, max_per_provider=3)
    keys = [hashlib.sha256(bytes([i])).digest() for i in range(5)]
    for i, k in enumerate(keys):
        assert store.add(k, contact(1), float(i))
    assert len(store) == 3 and store.records_of(contact(1).node_id) == 3
    assert store.keys() == keys[2:]
    assert store.add(keys[4], contact(1), 9.0)  # a refresh takes no room
    assert len(store) == 3


def test_a_full_store_takes_from_the_heaviest_announcer() -> None:
    """A flood fills the store; a node announcing little still gets in, at the flood's cost;
    an announcer as heavy as every other is refused rather than evicting them."""
    store = ProviderStore(ttl=100.0, max_records=10)
    keys = [hashlib.sha256(b"k%d" % i).digest() for i in range(30)]
    for k in keys[:10]:
        assert store.add(k, contact(1), 0.0)  # the flood
    assert len(store) == 10
    assert store.add(keys[10], contact(2), 1.0)  # light: evicts the flood's oldest
    assert len(store) == 10 and store.records_of(contact(1).node_id) == 9
    assert store.get(keys[0], 1.0) == [] and store.get(keys[10], 1.0) == [contact(2)]
    for i, k in enumerate(keys[11:15]):
        assert store.add(k, contact(3 + i), 2.0)
    assert store.records_of(contact(1).node_id) == 5
    # Five announcers of one record each and the flood at five: nobody holds more than
    # the flood, so its next record is refused; theirs stay.
    assert store.add(keys[20], contact(1), 3.0) is False
    assert all(store.records_of(contact(n).node_id) == 1 for n in range(2, 7))
    store.expire(200.0)
    assert len(store) == 0 and store.records_of(contact(1).node_id) == 0


def test_provider_store_bounded_under_a_many_key_flood() -> None:
    store = ProviderStore(ttl=100.0, max_records=1000, max_per_provider=50)
    for i in range(20_000):
        store.add(hashlib.sha256(b"%d" % i).digest(), contact(i % 400), float(i) / 1000)
    assert len(store) <= 1000
    assert max(store.records_of(contact(n).node_id) for n in range(400)) <= 50
