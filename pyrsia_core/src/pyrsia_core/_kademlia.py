"""Kademlia content routing, sans-I/O: routing table, iterative lookup, provider store.

Everything here is pure and deterministic (STYLE P1, P3): time comes in as ``now``
(seconds, any epoch, a float), randomness only from a ``random.Random`` the caller
passes in, and nothing is ever sent -- the runtime asks what to send and reports
what happened.

* :class:`Contact` -- a peer: 32-byte node id (SHA-256 of its public key, see
  :func:`~pyrsia_core.node_id_of`) and an address the transport understands.
* :class:`RoutingTable` -- 256 k-buckets; bucket ``i`` holds the contacts whose
  XOR distance to our id has bit length ``i + 1`` (that is, ``2**i <= d < 2**(i+1)``;
  bucket 255 is the far half of the id space, bucket 0 our nearest sibling).
  Within a bucket contacts are kept least-recently-seen first. A full bucket never
  evicts outright: the newcomer goes to the bucket's replacement cache and the
  least-recently-seen contact becomes a *ping candidate*, which the runtime takes
  with :meth:`RoutingTable.take_ping_candidates`, pings, and reports with
  :meth:`RoutingTable.evict_or_keep` (Kademlia §2.2: old live contacts are kept).
* :class:`Lookup` -- the iterative lookup state machine (``alpha`` parallel queries,
  terminating when the k closest known non-failed contacts have all answered).
  Per-contact query states move only along :data:`QUERY_TRANSITIONS` (STYLE P2).
  Timeouts are the runtime's: it calls :meth:`Lookup.on_failure`.
* :class:`ProviderStore` -- provider records with expiry and a per-key cap, plus
  the set of keys this node provides itself and when it last published them.
* :class:`SimNetwork` -- a deterministic discrete-event simulation of n nodes
  running these machines over an in-memory network with a seeded scheduler
  (random per-message latency, crashed nodes that time out), used by the tests
  and ``bench/sim_kademlia.py``.

Bad arguments (ids that are not 32 bytes, ``k < 1``, an unknown lookup kind, an
illegal query-state transition) raise plain :class:`ValueError`, as the other
core data structures do for misuse (see :mod:`pyrsia_core._merkle`). The node
layer verifies and decodes peer messages before it builds :class:`Contact` values.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import heapq
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final, Literal

import attrs

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_K",
    "ID_BITS",
    "ID_SIZE",
    "MAX_ADDRESS_LENGTH",
    "QUERY_TRANSITIONS",
    "Contact",
    "Lookup",
    "LookupKind",
    "ProviderStore",
    "QueryState",
    "RoutingTable",
    "SimNetwork",
    "SimReport",
    "xor_distance",
]

#: Size in bytes of a node id or a key (SHA-256).
ID_SIZE: Final = 32
#: Bits in an id: the routing table has this many buckets.
ID_BITS: Final = 256
#: Bucket size and replication parameter.
DEFAULT_K: Final = 20
#: Lookup parallelism.
DEFAULT_ALPHA: Final = 3
#: Longest address a :class:`Contact` accepts (every input has a size cap, STYLE P6).
MAX_ADDRESS_LENGTH: Final = 2048

LookupKind = Literal["nodes", "providers"]


def _check_id(value: object, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != ID_SIZE:
        got = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
        raise ValueError(f"{what} must be {ID_SIZE} bytes, got {got}")
    return value


def _check_count(value: object, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value


def _check_time(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return value


def _validate_node_id(_: object, __: attrs.Attribute[bytes], value: bytes) -> None:
    _check_id(value, "a node id")


def _validate_address(_: object, __: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"an address must be a str, got {type(value).__name__}")
    if len(value) > MAX_ADDRESS_LENGTH:
        raise ValueError(f"an address is at most {MAX_ADDRESS_LENGTH} characters")


@attrs.frozen
class Contact:
    """A peer as routing sees it: its 32-byte node id and its transport address."""

    node_id: bytes = attrs.field(validator=_validate_node_id)
    address: str = attrs.field(validator=_validate_address)
    #: ``node_id`` as a big-endian integer (derived; cached because XOR sorts need it).
    id_int: int = attrs.field(init=False, default=0, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "id_int", int.from_bytes(self.node_id, "big"))

    @classmethod
    def from_hex(cls, node_id_hex: str, address: str) -> Contact:
        """Build from the 64-character hex node id of :func:`~pyrsia_core.node_id_of`."""
        if not isinstance(node_id_hex, str) or len(node_id_hex) != 2 * ID_SIZE:
            raise ValueError("a hex node id is 64 hex characters")
        try:
            raw = bytes.fromhex(node_id_hex)
        except ValueError:
            raise ValueError(f"{node_id_hex!r:.80} is not hex") from None
        return cls(raw, address)

    @property
    def hex(self) -> str:
        return self.node_id.hex()

    def __repr__(self) -> str:
        return f"Contact({self.node_id.hex()[:16]}…, {self.address!r})"


def xor_distance(a: bytes, b: bytes) -> int:
    """The Kademlia distance between two 32-byte ids: their XOR as an unsigned integer."""
    _check_id(a, "an id")
    _check_id(b, "an id")
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


# --------------------------------------------------------------------------- routing table


@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)
class _Bucket:
    #: Least recently seen first.
    contacts: OrderedDict[bytes, Contact] = attrs.field(factory=OrderedDict)
    #: Newcomers that found the bucket full, freshest last, with when they were seen.
    replacements: OrderedDict[bytes, tuple[Contact, float]] = attrs.field(factory=OrderedDict)
    #: The contact the runtime was asked to ping, if any (one at a time per bucket).
    pending: Contact | None = None


@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)
class RoutingTable:
    """Kademlia k-buckets around ``own_id``.

    Call :meth:`update` with every contact the node *heard from directly* (a verified
    request or response), never with contacts merely mentioned by a third party.
    """

    own_id: bytes = attrs.field(validator=_validate_node_id)
    k: int = attrs.field(default=DEFAULT_K)
    _own_int: int = attrs.field(init=False, default=0)
    _buckets: dict[int, _Bucket] = attrs.field(init=False, factory=dict)
    _indices: list[int] = attrs.field(init=False, factory=list)  # of _buckets, ascending
    _last_seen: dict[bytes, float] = attrs.field(init=False, factory=dict)
    _refreshed: dict[int, float] = attrs.field(init=False, factory=dict)
    _outbox: list[Contact] = attrs.field(init=False, factory=list)

    @k.validator
    def _check_k(self, _: attrs.Attribute[int], value: int) -> None:
        _check_count(value, "k")

    def __attrs_post_init__(self) -> None:
        self._own_int = int.from_bytes(self.own_id, "big")

    # -- queries

    def bucket_index(self, node_id: bytes) -> int:
        """The bucket a contact with this id belongs in; -1 for our own id."""
        node_int = int.from_bytes(_check_id(node_id, "a node id"), "big")
        return (node_int ^ self._own_int).bit_length() - 1

    def __len__(self) -> int:
        return len(self._last_seen)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._last_seen

    def get(self, node_id: bytes) -> Contact | None:
        i = self.bucket_index(node_id)
        bucket = self._buckets.get(i)
        return None if bucket is None else bucket.contacts.get(node_id)

    def last_seen(self, node_id: bytes) -> float | None:
        """When we last heard from this contact; ``None`` if it is not in the table."""
        return self._last_seen.get(node_id)

    def contacts(self) -> list[Contact]:
        """Every contact, nearest bucket first, least recently seen first within a bucket."""
        return [c for i in sorted(self._buckets) for c in self._buckets[i].contacts.values()]

    def bucket(self, index: int) -> list[Contact]:
        """The contacts of bucket ``index`` (0..255), least recently seen first."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < ID_BITS:
            raise ValueError(f"a bucket index is 0..{ID_BITS - 1}, got {index!r}")
        bucket = self._buckets.get(index)
        return [] if bucket is None else list(bucket.contacts.values())

    def replacements(self, index: int) -> list[Contact]:
        """The replacement cache of bucket ``index``, freshest last."""
        self.bucket(index)  # validates
        bucket = self._buckets.get(index)
        return [] if bucket is None else [c for c, _ in bucket.replacements.values()]

    def closest(
        self, key: bytes, n: int | None = None, exclude: Iterable[bytes] = ()
    ) -> list[Contact]:
        """The ``n`` (default k) contacts closest to ``key`` by XOR distance, nearest first.

        Exact: buckets are visited in an order in which each group's distances to the
        key are all smaller than the next group's, so it stops as soon as it has ``n``.
        """
        key_int = int.from_bytes(_check_id(key, "a key"), "big")
        want = self.k if n is None else _check_count(n, "n", 0)
        if want == 0 or not self._last_seen:
            return []
        skip = frozenset(exclude)
        enough = want + len(skip)  # excluded contacts are dropped at the end
        found: list[Contact] = []
        buckets = self._buckets
        x = key_int ^ self._own_int
        # A contact in bucket i agrees with the key on the bits above i of its distance
        # to us, and differs at bit i; so each bucket is a band of distances to the key,
        # and the bands are ordered: first the buckets where bit i of x is 1, from high
        # i to low, then those where it is 0, from low i to high.
        indices = self._indices
        for i in reversed(indices):
            if (x >> i) & 1:
                found.extend(buckets[i].contacts.values())
                if len(found) >= enough:
                    break
        else:
            for i in indices:
                if not (x >> i) & 1:
                    found.extend(buckets[i].contacts.values())
                    if len(found) >= enough:
                        break
        found.sort(key=lambda c: c.id_int ^ key_int)
        if skip:
            found = [c for c in found if c.node_id not in skip]
        return found[:want]

    # -- updates

    def update(self, contact: Contact, now: float) -> bool:
        """Record that we heard from ``contact`` at ``now``.

        Returns ``True`` if the contact is in the table afterwards. If its bucket is
        full it is *not* added: it goes to the bucket's replacement cache, and (unless a
        ping is already pending for that bucket) the least-recently-seen contact becomes
        a ping candidate (:meth:`take_ping_candidates`). Our own id is never added.
        """
        if not isinstance(contact, Contact):
            raise ValueError(f"expected a Contact, got {type(contact).__name__}")
        _check_time(now, "now")
        i = (contact.id_int ^ self._own_int).bit_length() - 1
        if i < 0:
            return False
        bucket = self._buckets.get(i)
        if bucket is None:
            bucket = self._buckets[i] = _Bucket()
            bisect.insort(self._indices, i)
        nid = contact.node_id
        contacts = bucket.contacts
        if nid in contacts:
            contacts[nid] = contact  # the address may have changed
            contacts.move_to_end(nid)
            self._last_seen[nid] = now
            if bucket.pending is not None and bucket.pending.node_id == nid:
                self._clear_pending(bucket)  # it just proved it is alive
            return True
        if len(contacts) < self.k:
            contacts[nid] = contact
            self._last_seen[nid] = now
            bucket.replacements.pop(nid, None)
            return True
        replacements = bucket.replacements
        replacements[nid] = (contact, now)
        replacements.move_to_end(nid)
        if len(replacements) > self.k:
            replacements.popitem(last=False)
        if bucket.pending is None:
            oldest = next(iter(contacts.values()))
            bucket.pending = oldest
            self._outbox.append(oldest)
        return False

    def take_ping_candidates(self) -> list[Contact]:
        """Drain the ping candidates recorded since the last call (at most one per bucket).

        Ping each; report the outcome with :meth:`evict_or_keep`.
        """
        out, self._outbox = self._outbox, []
        return out

    @property
    def pending_pings(self) -> list[Contact]:
        """Every candidate whose ping outcome has not been reported yet."""
        return [b.pending for _, b in sorted(self._buckets.items()) if b.pending is not None]

    def evict_or_keep(self, candidate: Contact, alive: bool, now: float) -> Contact | None:
        """Report a ping of ``candidate``: keep it (moved to most recently seen) if it
        answered, else evict it and promote the freshest replacement, which is returned.
        """
        if not isinstance(candidate, Contact):
            raise ValueError(f"expected a Contact, got {type(candidate).__name__}")
        _check_time(now, "now")
        i = (candidate.id_int ^ self._own_int).bit_length() - 1
        bucket = self._buckets.get(i)
        if bucket is None:
            return None
        nid = candidate.node_id
        if bucket.pending is not None and bucket.pending.node_id == nid:
            self._clear_pending(bucket)
        if nid not in bucket.contacts:
            return None
        if alive:
            bucket.contacts.move_to_end(nid)
            self._last_seen[nid] = now
            return None
        del bucket.contacts[nid]
        del self._last_seen[nid]
        return self._promote(bucket)

    def remove(self, node_id: bytes) -> bool:
        """Drop a contact (say, it failed to answer); the freshest replacement takes its
        place. Returns whether it was in the table."""
        i = self.bucket_index(node_id)
        bucket = self._buckets.get(i)
        if bucket is None:
            return False
        bucket.replacements.pop(node_id, None)
        if bucket.contacts.pop(node_id, None) is None:
            return False
        del self._last_seen[node_id]
        if bucket.pending is not None and bucket.pending.node_id == node_id:
            self._clear_pending(bucket)
        self._promote(bucket)
        return True

    def _clear_pending(self, bucket: _Bucket) -> None:
        pending = bucket.pending
        bucket.pending = None
        if pending is not None and pending in self._outbox:
            self._outbox.remove(pending)

    def _promote(self, bucket: _Bucket) -> Contact | None:
        if not bucket.replacements or len(bucket.contacts) >= self.k:
            return None
        nid, (contact, seen) = bucket.replacements.popitem(last=True)
        bucket.contacts[nid] = contact
        self._last_seen[nid] = seen
        # Keep least-recently-seen order exact: the replacement may be older than some.
        if any(self._last_seen[other] > seen for other in bucket.contacts):
            ordered = sorted(bucket.contacts.items(), key=lambda kv: self._last_seen[kv[0]])
            bucket.contacts.clear()
            bucket.contacts.update(ordered)
        return contact

    # -- refresh

    def mark_refreshed(self, key: bytes, now: float) -> None:
        """Record a completed lookup for ``key``: its bucket needs no refresh for a while."""
        i = self.bucket_index(key)
        _check_time(now, "now")
        if i >= 0:
            self._refreshed[i] = now

    def stale_buckets(self, now: float, refresh_after: float) -> list[int]:
        """Buckets with no lookup in their range for ``refresh_after`` seconds (or ever).

        Only buckets from our nearest non-empty one outward are considered (Kademlia
        refreshes the buckets "further away than its closest neighbor"); the nearer ones
        are almost surely empty in the whole network. An empty table has nothing stale.
        """
        _check_time(now, "now")
        _check_time(refresh_after, "refresh_after")
        occupied = [i for i, b in self._buckets.items() if b.contacts]
        if not occupied:
            return []
        stale = []
        for i in range(min(occupied), ID_BITS):
            last = self._refreshed.get(i)
            if last is None or now - last >= refresh_after:
                stale.append(i)
        return stale

    def refresh_target(self, index: int, rng: random.Random) -> bytes:
        """A random id in bucket ``index``'s range: look it up to refresh that bucket."""
        self.bucket(index)  # validates
        distance = (1 << index) | rng.getrandbits(index) if index else 1
        return (self._own_int ^ distance).to_bytes(ID_SIZE, "big")

    def copy(self) -> RoutingTable:
        """An independent copy (contacts are immutable values and are shared)."""
        other = RoutingTable(self.own_id, self.k)
        for i, b in self._buckets.items():
            other._buckets[i] = _Bucket(
                OrderedDict(b.contacts), OrderedDict(b.replacements), b.pending
            )
        other._indices = list(self._indices)
        other._last_seen = dict(self._last_seen)
        other._refreshed = dict(self._refreshed)
        other._outbox = list(self._outbox)
        return other


# --------------------------------------------------------------------------- lookup


class QueryState(enum.Enum):
    """Where one contact stands in a :class:`Lookup`."""

    WAITING = "waiting"  # known, not asked yet
    IN_FLIGHT = "in-flight"  # asked, no answer yet
    ANSWERED = "answered"  # answered: it is responsive
    FAILED = "failed"  # timed out or errored: never asked again, never in the result


#: Every legal transition of a contact's query state, ``(state, event) -> state``.
#: Anything else raises ``ValueError``. A late answer after a timeout is ignored.
QUERY_TRANSITIONS: Final[Mapping[tuple[QueryState, str], QueryState]] = MappingProxyType(
    {
        (QueryState.WAITING, "send"): QueryState.IN_FLIGHT,
        (QueryState.WAITING, "failure"): QueryState.FAILED,
        (QueryState.IN_FLIGHT, "response"): QueryState.ANSWERED,
        (QueryState.IN_FLIGHT, "failure"): QueryState.FAILED,
        (QueryState.FAILED, "response"): QueryState.FAILED,
        (QueryState.FAILED, "failure"): QueryState.FAILED,
    }
)


@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)
class _Peer:
    contact: Contact
    distance: int
    depth: int
    state: QueryState = QueryState.WAITING


def _as_contacts(value: Iterable[Contact]) -> tuple[Contact, ...]:
    return tuple(value)


@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)
class Lookup:
    """An iterative Kademlia lookup for ``target`` (``FIND_NODE`` or ``GET_PROVIDERS``).

    Drive it: send the contacts :meth:`next_queries` returns, report each outcome with
    :meth:`on_response` or :meth:`on_failure` (the runtime owns the deadlines), and ask
    again, until :attr:`done`. At most ``alpha`` queries are in flight; only contacts
    among the ``k`` closest known non-failed ones are asked; no contact is asked twice.

    It is done -- and stays done -- when the ``k`` closest known non-failed contacts
    have all answered (or there is nobody left to ask), or, for ``kind="providers"``,
    once ``want_providers`` distinct providers were returned (default ``k``).

    ``hops``: seeds are at depth 1 and a contact first learned from a depth-``h``
    answer is at depth ``h + 1``; ``hops`` is the greatest depth of a contact that
    answered, the number of sequential round trips on the lookup's longest chain.
    """

    target: bytes = attrs.field(validator=_validate_node_id)
    seeds: tuple[Contact, ...] = attrs.field(converter=_as_contacts)
    kind: LookupKind = "nodes"
    alpha: int = DEFAULT_ALPHA
    k: int = DEFAULT_K
    want_providers: int | None = attrs.field(default=None, kw_only=True)
    #: The querying node's own id: never asked, never in the result.
    own_id: bytes | None = attrs.field(default=None, kw_only=True)

    _target_int: int = attrs.field(init=False, default=0)
    _peers: dict[bytes, _Peer] = attrs.field(init=False, factory=dict)
    _order: list[int] = attrs.field(init=False, factory=list)  # distances, ascending
    _by_distance: dict[int, _Peer] = attrs.field(init=False, factory=dict)
    _providers: dict[bytes, Contact] = attrs.field(init=False, factory=dict)
    _in_flight: int = attrs.field(init=False, default=0)
    _queries: int = attrs.field(init=False, default=0)
    _failures: int = attrs.field(init=False, default=0)
    _hops: int = attrs.field(init=False, default=0)
    _done: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        if self.kind not in ("nodes", "providers"):
            raise ValueError(f"a lookup kind is 'nodes' or 'providers', got {self.kind!r}")
        _check_count(self.alpha, "alpha")
        _check_count(self.k, "k")
        if self.want_providers is not None:
            _check_count(self.want_providers, "want_providers")
        if self.own_id is not None:
            _check_id(self.own_id, "own_id")
        self._target_int = int.from_bytes(self.target, "big")
        for seed in self.seeds:
            if not isinstance(seed, Contact):
                raise ValueError(f"seeds must be Contacts, got {type(seed).__name__}")
            self._learn(seed, 1)
        self._update_done()

    # -- inputs

    def next_queries(self) -> list[Contact]:
        """Contacts to query now (marked in flight); empty when done or at ``alpha`` in flight."""
        if self._done:
            return []
        slots = self.alpha - self._in_flight
        out: list[Contact] = []
        if slots <= 0:
            return out
        seen = 0
        by_distance = self._by_distance
        for distance in self._order:
            peer = by_distance[distance]
            state = peer.state
            if state is QueryState.FAILED:
                continue
            if state is QueryState.WAITING:
                self._transition(peer, "send")
                out.append(peer.contact)
                if len(out) == slots:
                    break
            seen += 1
            if seen == self.k:
                break
        self._in_flight += len(out)
        self._queries += len(out)
        return out

    def on_response(
        self,
        contact: Contact,
        closer: Sequence[Contact],
        providers: Sequence[Contact] | None = None,
    ) -> None:
        """``contact`` answered with ``closer`` contacts (and, for ``GET_PROVIDERS``,
        ``providers``). At most ``k`` of each list are read."""
        peer = self._peer_for(contact)
        before = peer.state
        self._transition(peer, "response")
        if before is not QueryState.IN_FLIGHT:
            return  # a late answer after a timeout
        self._in_flight -= 1
        if peer.depth > self._hops:
            self._hops = peer.depth
        depth = peer.depth + 1
        peers = self._peers
        own = self.own_id
        for c in closer[: self.k]:
            if not isinstance(c, Contact):
                raise ValueError(f"closer contacts must be Contacts, got {type(c).__name__}")
            if c.node_id not in peers and c.node_id != own:
                self._learn(c, depth)
        if providers:
            for p in providers[: self.k]:
                if not isinstance(p, Contact):
                    raise ValueError(f"providers must be Contacts, got {type(p).__name__}")
                self._providers.setdefault(p.node_id, p)
        self._update_done()

    def on_failure(self, contact: Contact) -> None:
        """``contact`` timed out or errored: it is never asked again nor returned."""
        peer = self._peer_for(contact)
        before = peer.state
        self._transition(peer, "failure")
        if before is QueryState.IN_FLIGHT:
            self._in_flight -= 1
        if before is not QueryState.FAILED:
            self._failures += 1
        self._update_done()

    # -- outputs

    @property
    def done(self) -> bool:
        return self._done

    def result(self) -> list[Contact]:
        """The ``k`` closest contacts that answered, nearest first."""
        out: list[Contact] = []
        for distance in self._order:
            peer = self._by_distance[distance]
            if peer.state is QueryState.ANSWERED:
                out.append(peer.contact)
                if len(out) == self.k:
                    break
        return out

    def providers(self) -> list[Contact]:
        """Distinct providers returned so far, in the order they were first seen."""
        return list(self._providers.values())

    def state_of(self, node_id: bytes) -> QueryState | None:
        peer = self._peers.get(node_id)
        return None if peer is None else peer.state

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queries(self) -> int:
        """Queries sent so far."""
        return self._queries

    @property
    def failures(self) -> int:
        return self._failures

    @property
    def hops(self) -> int:
        return self._hops

    # -- internals

    def _learn(self, contact: Contact, depth: int) -> None:
        nid = contact.node_id
        if nid in self._peers or nid == self.own_id:
            return
        distance = contact.id_int ^ self._target_int
        peer = _Peer(contact, distance, depth)
        self._peers[nid] = peer
        self._by_distance[distance] = peer
        bisect.insort(self._order, distance)

    def _peer_for(self, contact: Contact) -> _Peer:
        if not isinstance(contact, Contact):
            raise ValueError(f"expected a Contact, got {type(contact).__name__}")
        peer = self._peers.get(contact.node_id)
        if peer is None:
            raise ValueError(f"{contact!r} is not part of this lookup")
        return peer

    @staticmethod
    def _transition(peer: _Peer, event: str) -> None:
        new = QUERY_TRANSITIONS.get((peer.state, event))
        if new is None:
            raise ValueError(
                f"illegal lookup transition: {event!r} for {peer.contact!r} "
                f"in state {peer.state.value}"
            )
        peer.state = new

    def _update_done(self) -> None:
        if self._done:
            return
        if self.kind == "providers":
            want = self.k if self.want_providers is None else self.want_providers
            if len(self._providers) >= want:
                self._done = True
                return
        seen = 0
        for distance in self._order:
            state = self._by_distance[distance].state
            if state is QueryState.FAILED:
                continue
            if state is not QueryState.ANSWERED:
                return
            seen += 1
            if seen == self.k:
                break
        self._done = True


# --------------------------------------------------------------------------- provider store


@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)
class ProviderStore:
    """Provider records (``key -> providers``) with expiry, and this node's own keys.

    A record lives until ``min(expires, now + ttl)``: a peer cannot make us keep it
    longer than ``ttl``. A key holds at most ``max_per_key`` providers (a full key
    drops the record that expires first, if the new one outlives it); the store holds
    at most ``max_keys`` keys and ``max_records`` records in all, and one provider (the
    announcing node) at most ``max_per_provider`` of them: its oldest record makes room
    for its newest. A full store makes room by dropping the oldest record of the
    provider holding the most, if that is more than the newcomer's provider holds;
    otherwise the new record is refused. So a flood from many keys costs bounded memory
    and a provider announcing little still gets its records in.

    The keys this node provides itself are registered with :meth:`provide`; a key is
    also this node's own if a live record names ``own_id`` as the provider.
    :meth:`due_for_republish` lists the own keys not published for ``interval``.
    """

    ttl: float
    max_per_key: int = DEFAULT_K
    max_keys: int = 1_000_000
    max_records: int = 1_000_000
    max_per_provider: int = 1_000_000
    #: key -> provider node id -> (provider, expires, added)
    _records: dict[bytes, dict[bytes, tuple[Contact, float, float]]] = attrs.field(
        init=False, factory=dict
    )
    #: provider node id -> its keys, oldest record first
    _by_provider: dict[bytes, dict[bytes, None]] = attrs.field(init=False, factory=dict)
    #: record count -> the providers holding that many (to find the heaviest fast)
    _by_count: dict[int, set[bytes]] = attrs.field(init=False, factory=dict)
    _heaviest: int = attrs.field(init=False, default=0)
    _count: int = attrs.field(init=False, default=0)
    #: own key -> last published (None: never)
    _own: dict[bytes, float | None] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        _check_time(self.ttl, "ttl")
        if self.ttl <= 0:
            raise ValueError(f"ttl must be positive, got {self.ttl!r}")
        _check_count(self.max_per_key, "max_per_key")
        _check_count(self.max_keys, "max_keys")
        _check_count(self.max_records, "max_records")
        _check_count(self.max_per_provider, "max_per_provider")

    # -- record bookkeeping (every insertion and removal goes through these two)

    def _insert(self, key: bytes, record: tuple[Contact, float, float]) -> None:
        nid = record[0].node_id
        records = self._records.setdefault(key, {})
        if nid in records:
            records[nid] = record
            keys = self._by_provider[nid]
            del keys[key]
            keys[key] = None  # now its newest
            return
        records[nid] = record
        keys = self._by_provider.setdefault(nid, {})
        old = len(keys)
        keys[key] = None
        self._recount(nid, old, old + 1)
        self._count += 1

    def _delete(self, key: bytes, nid: bytes) -> None:
        records = self._records.get(key)
        if records is None or records.pop(nid, None) is None:
            return
        if not records:
            del self._records[key]
        keys = self._by_provider[nid]
        old = len(keys)
        del keys[key]
        if not keys:
            del self._by_provider[nid]
        self._recount(nid, old, old - 1)
        self._count -= 1

    def _recount(self, nid: bytes, old: int, new: int) -> None:
        if old:
            holders = self._by_count[old]
            holders.discard(nid)
            if not holders:
                del self._by_count[old]
        if new:
            self._by_count.setdefault(new, set()).add(nid)
            self._heaviest = max(self._heaviest, new)
        while self._heaviest and self._heaviest not in self._by_count:
            self._heaviest -= 1

    def records_of(self, provider_id: bytes) -> int:
        """How many records name ``provider_id`` as the provider."""
        return len(self._by_provider.get(provider_id, ()))

    def _make_room(self, nid: bytes) -> bool:
        """Room for one more record by ``nid``: its own oldest goes if it is at its cap;
        in a full store the heaviest provider's oldest goes if it holds more."""
        mine = self._by_provider.get(nid)
        held = len(mine) if mine else 0
        if mine and held >= self.max_per_provider:
            self._delete(next(iter(mine)), nid)
            return True
        if self._count < self.max_records:
            return True
        if self._heaviest <= held + 1:
            return False
        victim = next(iter(self._by_count[self._heaviest]))
        self._delete(next(iter(self._by_provider[victim])), victim)
        return True

    def add(self, key: bytes, provider: Contact, now: float, expires: float | None = None) -> bool:
        """Store (or refresh) ``provider`` for ``key``; returns whether it is stored."""
        _check_id(key, "a key")
        if not isinstance(provider, Contact):
            raise ValueError(f"expected a Contact, got {type(provider).__name__}")
        _check_time(now, "now")
        until = now + self.ttl
        if expires is not None:
            until = min(_check_time(expires, "expires"), until)
        if until <= now:
            return False
        records = self._records.get(key)
        nid = provider.node_id
        if records is not None and nid in records:
            self._insert(key, (provider, until, now))  # a refresh takes no room
            return True
        if records is None and len(self._records) >= self.max_keys:
            self.expire(now)
            if len(self._records) >= self.max_keys:
                return False
        if records is not None and len(records) >= self.max_per_key:
            for other, (_, other_expires, _) in list(records.items()):
                if other_expires <= now:
                    self._delete(key, other)
            if len(records) >= self.max_per_key:
                first = min(records, key=lambda n: records[n][1])
                if records[first][1] >= until:
                    return False
                self._delete(key, first)
        if not self._make_room(nid):
            return False
        self._insert(key, (provider, until, now))
        return True

    def get(self, key: bytes, now: float) -> list[Contact]:
        """Live providers of ``key``, the longest-lived first (expired ones are dropped)."""
        _check_id(key, "a key")
        _check_time(now, "now")
        records = self._records.get(key)
        if not records:
            return []
        for nid in [n for n, (_, until, _) in records.items() if until <= now]:
            self._delete(key, nid)
        if not records:
            return []
        ordered = sorted(records.values(), key=lambda r: r[1], reverse=True)
        return [p for p, _, _ in ordered]

    def expire(self, now: float) -> int:
        """Drop every expired record; returns how many."""
        _check_time(now, "now")
        dropped = 0
        for key in list(self._records):
            records = self._records[key]
            for nid in [n for n, (_, until, _) in records.items() if until <= now]:
                self._delete(key, nid)
                dropped += 1
        return dropped

    def keys(self) -> list[bytes]:
        return list(self._records)

    def __len__(self) -> int:
        return self._count

    # -- this node's own keys

    def provide(self, key: bytes) -> None:
        """This node holds the artifact ``key``: publish it (now) and republish it."""
        _check_id(key, "a key")
        self._own.setdefault(key, None)

    def unprovide(self, key: bytes) -> None:
        self._own.pop(_check_id(key, "a key"), None)

    def provided(self) -> list[bytes]:
        return list(self._own)

    def mark_published(self, key: bytes, now: float) -> None:
        """Record that ``ADD_PROVIDER`` for an own ``key`` went out at ``now``."""
        _check_id(key, "a key")
        self._own[key] = _check_time(now, "now")

    def due_for_republish(self, now: float, own_id: bytes, interval: float) -> list[bytes]:
        """Own keys never published, or last published ``interval`` or more ago.

        Own keys are those given to :meth:`provide` and those with a live record naming
        ``own_id``; for the latter the record's time counts as its last publication
        unless :meth:`mark_published` says later.
        """
        _check_time(now, "now")
        _check_id(own_id, "own_id")
        _check_time(interval, "interval")
        last: dict[bytes, float | None] = dict(self._own)
        for key, records in self._records.items():
            record = records.get(own_id)
            if record is None or record[1] <= now:
                continue
            added = record[2]
            if key not in last:
                last[key] = added
            else:
                marked = last[key]
                if marked is not None:
                    last[key] = max(marked, added)
        return [key for key, t in last.items() if t is None or now - t >= interval]


# --------------------------------------------------------------------------- simulation


@attrs.frozen
class SimReport:
    """What one :meth:`SimNetwork.run` measured (deterministic for a given seed)."""

    nodes: int
    crashed: int
    lookups: int
    #: Fraction of node lookups whose result is exactly the true k closest live nodes.
    exact: float
    mean_hops: float
    p99_hops: int
    mean_queries: float
    mean_failures: float
    #: Mean simulated lookup latency in seconds.
    mean_latency: float
    provider_lookups: int
    #: Fraction of ``GET_PROVIDERS`` lookups that found the published provider.
    providers_found: float
    provider_mean_hops: float
    #: Messages delivered or timed out during the run.
    messages: int


@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)
class _SimNode:
    contact: Contact
    table: RoutingTable
    store: ProviderStore
    alive: bool = True


@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)
class _SimRun:
    node: _SimNode
    lookup: Lookup
    started: float
    on_done: Callable[[_SimRun], None] | None
    finished: bool = False
    ended: float = 0.0


class SimNetwork:
    """n Kademlia nodes over an in-memory network driven by a seeded event scheduler.

    Node ids are SHA-256 of bytes from ``random.Random(seed)``. Every message takes a
    latency drawn uniformly from ``latency`` (seconds); a query to a crashed node fails
    after ``timeout``. Each node runs the real machines: it updates its
    :class:`RoutingTable` with every node it hears from (pinging the least-recently-seen
    contact of a full bucket, and evicting it if the ping times out), removes contacts
    whose query timed out, answers ``FIND_NODE`` / ``GET_PROVIDERS`` from its table and
    :class:`ProviderStore`, and drives each of its lookups with :class:`Lookup`.

    :meth:`bootstrap` joins the nodes in growing batches: each joins through one random
    node that joined before and looks up its own id. :meth:`crash` stops a fraction of
    the nodes, and :meth:`run` measures lookups and provider records.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        k: int = DEFAULT_K,
        alpha: int = DEFAULT_ALPHA,
        *,
        latency: tuple[float, float] = (0.01, 0.1),
        timeout: float = 1.0,
        provider_ttl: float = 86_400.0,
        join_batch: float = 0.1,
    ) -> None:
        _check_count(n, "n")
        _check_count(k, "k")
        _check_count(alpha, "alpha")
        if not 0 <= latency[0] <= latency[1] < timeout:
            raise ValueError("need 0 <= min latency <= max latency < timeout")
        if not 0 < join_batch <= 1:
            raise ValueError("join_batch is a fraction in (0, 1]")
        self.k = k
        self.alpha = alpha
        self.latency = latency
        self.timeout = timeout
        self.join_batch = join_batch
        self.rng = random.Random(seed)
        self.now = 0.0
        self.messages = 0
        self.nodes: list[_SimNode] = []
        self._by_id: dict[bytes, _SimNode] = {}
        for i in range(n):
            node_id = hashlib.sha256(self.rng.randbytes(32)).digest()
            contact = Contact(node_id, f"sim://{i}")
            node = _SimNode(contact, RoutingTable(node_id, k), ProviderStore(provider_ttl))
            self.nodes.append(node)
            self._by_id[node_id] = node
        self._queue: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self.joined = 0

    # -- scheduler

    def _at(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (self.now + delay, self._seq, fn, args))

    def _latency(self) -> float:
        low, high = self.latency
        return self.rng.uniform(low, high)

    def run_until_idle(self) -> None:
        queue = self._queue
        while queue:
            when, _, fn, args = heapq.heappop(queue)
            self.now = when
            fn(*args)

    # -- node behaviour

    def _heard_from(self, node: _SimNode, contact: Contact) -> None:
        table = node.table
        if not table.update(contact, self.now):
            for candidate in table.take_ping_candidates():
                self.messages += 1
                peer = self._by_id.get(candidate.node_id)
                if peer is not None and peer.alive:
                    rtt = self._latency() + self._latency()
                    self._at(rtt, self._ping_done, node, candidate, True)
                else:
                    self._at(self.timeout, self._ping_done, node, candidate, False)

    def _ping_done(self, node: _SimNode, candidate: Contact, alive: bool) -> None:
        node.table.evict_or_keep(candidate, alive, self.now)

    def _start(
        self, node: _SimNode, lookup: Lookup, on_done: Callable[[_SimRun], None] | None
    ) -> _SimRun:
        run = _SimRun(node, lookup, self.now, on_done)
        self._pump(run)
        return run

    def _pump(self, run: _SimRun) -> None:
        if run.finished:
            return
        lookup = run.lookup
        if lookup.done:
            run.finished = True
            run.ended = self.now
            if lookup.kind == "nodes":
                run.node.table.mark_refreshed(lookup.target, self.now)
            if run.on_done is not None:
                run.on_done(run)
            return
        for contact in lookup.next_queries():
            self.messages += 1
            peer = self._by_id.get(contact.node_id)
            if peer is None or not peer.alive:
                self._at(self.timeout, self._query_failed, run, contact)
            else:
                self._at(self._latency(), self._query_arrives, run, contact, peer)

    def _query_arrives(self, run: _SimRun, contact: Contact, peer: _SimNode) -> None:
        lookup = run.lookup
        requester = run.node.contact
        self._heard_from(peer, requester)
        closer = peer.table.closest(lookup.target, self.k, exclude=(requester.node_id,))
        providers = peer.store.get(lookup.target, self.now) if lookup.kind == "providers" else None
        self._at(self._latency(), self._answer_arrives, run, contact, closer, providers)

    def _answer_arrives(
        self,
        run: _SimRun,
        contact: Contact,
        closer: list[Contact],
        providers: list[Contact] | None,
    ) -> None:
        self._heard_from(run.node, contact)
        run.lookup.on_response(contact, closer, providers)
        self._pump(run)

    def _query_failed(self, run: _SimRun, contact: Contact) -> None:
        run.node.table.remove(contact.node_id)
        run.lookup.on_failure(contact)
        self._pump(run)

    def _add_provider_arrives(self, peer: _SimNode, key: bytes, provider: Contact) -> None:
        if peer.alive:
            self._heard_from(peer, provider)
            peer.store.add(key, provider, self.now)

    def _lookup(self, node: _SimNode, target: bytes, kind: LookupKind, **kw: Any) -> Lookup:
        seeds = node.table.closest(target, self.k)
        return Lookup(target, seeds, kind, self.alpha, self.k, own_id=node.contact.node_id, **kw)

    # -- phases

    def bootstrap(self) -> None:
        """Join every node not joined yet, in batches of ``join_batch`` of the joined."""
        if self.joined == 0:
            self.joined = 1
        n = len(self.nodes)
        while self.joined < n:
            start = self.joined
            end = min(n, start + max(1, int(start * self.join_batch)))
            for node in self.nodes[start:end]:
                seed = self.nodes[self.rng.randrange(start)]
                node.table.update(seed.contact, self.now)
                self._start(node, self._lookup(node, node.contact.node_id, "nodes"), None)
            self.run_until_idle()
            self.joined = end

    def crash(self, fraction: float) -> int:
        """Stop ``fraction`` of the nodes (chosen at random); returns how many."""
        if not 0 <= fraction < 1:
            raise ValueError("the crashed fraction is in [0, 1)")
        alive = [node for node in self.nodes if node.alive]
        count = round(len(self.nodes) * fraction)
        for node in self.rng.sample(alive, min(count, len(alive) - 1)):
            node.alive = False
        return sum(not node.alive for node in self.nodes)

    def fork(self) -> SimNetwork:
        """An independent copy of the network's state (to run scenarios from one build)."""
        other = SimNetwork.__new__(SimNetwork)
        other.k, other.alpha = self.k, self.alpha
        other.latency, other.timeout, other.join_batch = self.latency, self.timeout, self.join_batch
        other.rng = random.Random()
        other.rng.setstate(self.rng.getstate())
        other.now, other.messages, other.joined = self.now, self.messages, self.joined
        if self._queue:
            raise ValueError("fork an idle network (run_until_idle first)")
        other._queue, other._seq = [], self._seq
        other.nodes = []
        for node in self.nodes:
            store = ProviderStore(node.store.ttl, node.store.max_per_key, node.store.max_keys,
                                  node.store.max_records, node.store.max_per_provider)
            if len(node.store) or node.store.provided():
                raise ValueError("fork a network before provider records are stored")
            other.nodes.append(_SimNode(node.contact, node.table.copy(), store, node.alive))
        other._by_id = {node.contact.node_id: node for node in other.nodes}
        return other

    def true_closest(self, key: bytes, exclude: bytes | None = None) -> list[bytes]:
        """Brute force: ids of the k live nodes closest to ``key`` (without ``exclude``)."""
        key_int = int.from_bytes(_check_id(key, "a key"), "big")
        live = (n.contact for n in self.nodes if n.alive and n.contact.node_id != exclude)
        best = heapq.nsmallest(self.k, live, key=lambda c: c.id_int ^ key_int)
        return [c.node_id for c in best]

    def run(self, lookups: int, provider_lookups: int | None = None) -> SimReport:
        """Run ``lookups`` node lookups for random keys from random live nodes, then publish
        ``provider_lookups`` random keys (a lookup, then ``ADD_PROVIDER`` to the k closest)
        and look each up with ``GET_PROVIDERS`` from another random live node."""
        _check_count(lookups, "lookups", 0)
        provider_lookups = lookups if provider_lookups is None else provider_lookups
        _check_count(provider_lookups, "provider_lookups", 0)
        start_messages = self.messages
        live = [node for node in self.nodes if node.alive]
        if len(live) < 2:
            raise ValueError("need at least two live nodes")

        # Node lookups, all started together.
        runs: list[tuple[_SimRun, list[bytes]]] = []
        for _ in range(lookups):
            key = self.rng.randbytes(ID_SIZE)
            node = self.rng.choice(live)
            truth = self.true_closest(key, exclude=node.contact.node_id)
            runs.append((self._start(node, self._lookup(node, key, "nodes"), None), truth))
        self.run_until_idle()
        exact = sum([c.node_id for c in run.lookup.result()] == truth for run, truth in runs)
        hops = sorted(run.lookup.hops for run, _ in runs)

        # Provider records: publish, then look up from another node.
        published: list[tuple[bytes, _SimNode, _SimNode]] = []

        def publish(run: _SimRun) -> None:
            key = run.lookup.target
            for contact in run.lookup.result():
                peer = self._by_id[contact.node_id]
                self.messages += 1
                self._at(self._latency(), self._add_provider_arrives, peer, key, run.node.contact)

        for _ in range(provider_lookups):
            key = self.rng.randbytes(ID_SIZE)
            publisher, getter = self.rng.sample(live, 2)
            published.append((key, publisher, getter))
            self._start(publisher, self._lookup(publisher, key, "nodes"), publish)
        self.run_until_idle()
        provider_runs = [
            (
                self._start(getter, self._lookup(getter, key, "providers", want_providers=1), None),
                publisher.contact.node_id,
            )
            for key, publisher, getter in published
        ]
        self.run_until_idle()
        found = sum(
            any(p.node_id == publisher for p in run.lookup.providers())
            for run, publisher in provider_runs
        )
        return SimReport(
            nodes=len(self.nodes),
            crashed=len(self.nodes) - len(live),
            lookups=lookups,
            exact=exact / lookups if lookups else 1.0,
            mean_hops=_mean(hops),
            p99_hops=hops[max(0, math.ceil(0.99 * len(hops)) - 1)] if hops else 0,
            mean_queries=_mean([run.lookup.queries for run, _ in runs]),
            mean_failures=_mean([run.lookup.failures for run, _ in runs]),
            mean_latency=_mean([run.ended - run.started for run, _ in runs]),
            provider_lookups=provider_lookups,
            providers_found=found / provider_lookups if provider_lookups else 1.0,
            provider_mean_hops=_mean([run.lookup.hops for run, _ in provider_runs]),
            messages=self.messages - start_messages,
        )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
