"""Driving the core's Tendermint machine on a build node (DESIGN §5).

One :class:`~pyrsia_core.consensus.TendermintMachine` per height. Inputs: consensus
messages from other validators (through the peer transport), timers, and this
node's pending records. Outputs: messages broadcast to the other validators and,
on a decision, the committed block, which is validated and stored like any block
and then gossiped to every peer.

A validator prevotes for a block only after it rebuilt every artifact itself (for
Docker: fetched the image from its own upstream and hashed it) and got the same
hashes -- the ``build_check`` given to the machine, run in the background.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import attrs
from pyrsia_core._consensus import (
    MessageError,
    Output,
    Proposal,
    TendermintMachine,
    Timeouts,
    message_from_json,
)
from pyrsia_core.errors import BlockError, EncodingError, RecordError, SignatureError

from pyrsia_core import Block, CommittedBlock, SignedRecord, canonical_json, canonical_loads

from ._node import BuildError, Node
from ._priority import urgent

__all__ = ["ConsensusRunner"]

log = logging.getLogger("pyrsia.consensus")
MAX_PENDING = 100_000
MAX_REBUILDS = 2  # other build nodes' builds rebuilt at once
MAX_CONSENSUS_BATCH = 64  # messages in one CONSENSUS request (the receiver's limit too)
SNAPSHOT_KEY = b"c/snapshot"


def _json_list(items: list[Any]) -> bytes:
    return json.dumps(items, separators=(",", ":"), ensure_ascii=False).encode()


@attrs.define(eq=False)
class _Waiter:
    event: anyio.Event = attrs.Factory(anyio.Event)
    block: CommittedBlock | None = None


@attrs.define(eq=False)
class ConsensusRunner:
    node: Node
    #: ``(block) -> awaitable bool``: did this node rebuild every artifact with equal hashes?
    rebuild: Callable[[Block], Awaitable[bool]]
    #: ``(type, body, node ids)``: send a message to these validators.
    #: With ``attachment=``, bulk bytes (a JSON list) sent after the signed envelope.
    send: Callable[..., Awaitable[None]]
    timeouts: Timeouts = attrs.Factory(
        lambda: Timeouts(propose=1.0, prevote=0.5, precommit=0.5, poll=0.01)
    )
    pending: dict[str, SignedRecord] = attrs.Factory(dict)  # record id -> record
    machine: TendermintMachine | None = None
    _inbox: list[tuple[str, Any]] = attrs.Factory(list)
    _wake: anyio.Event = attrs.Factory(anyio.Event)
    _checks: dict[str, bool | None] = attrs.Factory(dict)
    _tg: anyio.abc.TaskGroup | None = None
    #: Other build nodes' pending records this node rebuilt itself with equal hashes.
    vouched: set[str] = attrs.Factory(set)
    #: submit() calls waiting for their block, by the id of their first record.
    _waiters: dict[str, _Waiter] = attrs.Factory(dict)
    #: Ids of recently committed records: never pending or proposed again.
    _committed_ids: dict[str, None] = attrs.Factory(dict)
    #: Who rebuilt each pending record with equal hashes (its builder, this node, and
    #: the build nodes that said so with VOUCH), and when it became pending here.
    vouchers: dict[str, set[str]] = attrs.Factory(dict)
    _pending_since: dict[str, float] = attrs.Factory(dict)
    #: Rebuilds of pending records in progress (record id -> done).
    _vouching: dict[str, anyio.Event] = attrs.Factory(dict)
    #: How long a proposer waits for a quorum of vouches before it proposes records
    #: that only it (and their builder) rebuilt.
    vouch_wait: float = 5.0
    #: ... unless a build node missing from its vouchers sent a VOUCH this recently.
    vouch_idle: float = 2.0
    #: ... and never longer than this.
    vouch_max: float = 30.0
    _last_vouch: dict[str, float] = attrs.Factory(dict)
    #: How long a proposer holds ready records while more builds are on their way.
    batch_wait: float = 1.0
    _ready_since: dict[str, float] = attrs.Factory(dict)
    _rebuilds: anyio.Semaphore = attrs.Factory(lambda: anyio.Semaphore(MAX_REBUILDS))
    #: When this node first saw a proposal of the committed block (for the log).
    _proposed_at: dict[str, float] = attrs.Factory(dict)
    #: A height undecided this long is a stall: logged (naming the silent build nodes),
    #: shown in the node's status and in its builds' status.
    stall_after: float = 10.0
    #: The height being decided and since when (monotonic), while one is.
    _height: int | None = None
    _height_since: float = 0.0
    _stall_logged: float = 0.0
    #: The highest consensus height each build node sent a message for.
    _heard_height: dict[str, int] = attrs.Factory(dict)

    # -- inputs from the network and the node ----------------------------------------

    def deliver(self, sender: str, message: Any) -> None:
        """A consensus message from a peer (queued; the machine checks everything)."""
        if len(self._inbox) > 10_000:
            raise ValueError("consensus inbox is full")
        if sender not in self.node.log_store.ledger.validators:
            # Dropped here, so that no outsider can start a height or fill the inbox.
            log.info("Consensus ignored a message from %s: the sender is not a build node",
                     sender[:16])
            return
        self._inbox.append((sender, message))
        height = message.get("height") if isinstance(message, dict) else None
        if type(height) is int and height > self._heard_height.get(sender, -1):
            self._heard_height[sender] = height
        self._wake.set()

    def add_pending(self, records: Any, sender: str) -> None:
        """Records a build node built and wants committed (checked before they are kept)."""
        if not isinstance(records, list) or len(records) > 10_000:
            raise ValueError("PENDING needs a list of at most 10000 records")
        validators = self.node.log_store.ledger.validators
        if sender not in validators:
            raise ValueError("only build nodes submit records")
        added = 0
        fresh: list[SignedRecord] = []
        for item in records:
            try:
                sr = SignedRecord.from_json(item)
                sr.verify()
            except (RecordError, SignatureError) as exc:
                raise ValueError(f"bad pending record: {exc}") from None
            if sr.record.node_id not in validators:
                raise ValueError("a pending record must be by a build node")
            if sr.record.id in self._committed_ids:
                continue  # a PENDING that arrived after the block holding it
            if len(self.pending) < MAX_PENDING and sr.record.id not in self.pending:
                self._add(sr)
                self.vouchers[sr.record.id].add(sender)
                fresh.append(sr)
                added += 1
        if added and self._tg is not None:
            for sr in fresh:
                self._vouching[sr.record.id] = anyio.Event()
            self._tg.start_soon(self._vouch, fresh)

    def _add(self, sr: SignedRecord) -> None:
        self.pending[sr.record.id] = sr
        self.vouchers.setdefault(sr.record.id, {sr.record.node_id})
        self._pending_since.setdefault(sr.record.id, self.node.clock.monotonic())

    def add_vouch(self, ids: Any, sender: str) -> None:
        """Another build node says it rebuilt these pending records with equal hashes."""
        if not isinstance(ids, list) or len(ids) > 10_000:
            raise ValueError("VOUCH needs a list of at most 10000 record ids")
        if sender not in self.node.log_store.ledger.validators:
            raise ValueError("only build nodes vouch")
        self._last_vouch[sender] = self.node.clock.monotonic()
        for rid in ids:
            if isinstance(rid, str) and rid in self.vouchers:
                self.vouchers[rid].add(sender)
        self._wake.set()

    async def _vouch(self, records: list[SignedRecord]) -> None:
        """Rebuild another build node's records now, so this node can propose them if its
        turn comes first (a tampered build is never vouched for)."""
        probe = Block(
            height=0,
            parent="0" * 64,
            timestamp=0,
            proposer=self.node.node_id,
            records=tuple(records),
            tree_size=0,
            root="0" * 64,
        )
        try:
            # A few rebuilds at a time: a build node asked to rebuild many builds at once
            # keeps its event loop free for consensus messages (and is not faster for
            # running them all together on the same cores).
            async with self._rebuilds:
                ok = await self.rebuild(probe)
        except Exception as exc:
            log.warning("Rebuild of pending records failed: %s", exc)
            ok = False
        finally:
            for sr in records:
                done = self._vouching.pop(sr.record.id, None)
                if done is not None:
                    done.set()
        if ok:
            ids = [sr.record.id for sr in records]
            self.vouched.update(ids)
            for rid in ids:
                if rid in self.vouchers:
                    self.vouchers[rid].add(self.node.node_id)
            packages = sorted({sr.record.package_specific_id for sr in records})
            log.info("Rebuilt and vouched for %d pending record(s) of %s", len(records),
                     ", ".join(packages))
            await self.send("VOUCH", {"records": ids}, self._others())
            self._wake.set()

    def _others(self) -> list[str]:
        """The other build nodes."""
        return [v for v in self.node.log_store.ledger.validators.ordered()
                if v != self.node.node_id]

    async def submit(self, records: list[SignedRecord], *, wait: float = 120.0) -> CommittedBlock:
        """Have ``records`` committed by the build nodes; return the block that holds them."""
        # A build's records are committed together: wait for the block holding the first.
        # The waiter exists before anything is sent, so no commit can slip past it.
        first = records[0].record.id
        waiter = self._waiters[first] = _Waiter()
        started = self.node.clock.monotonic()
        try:
            for sr in records:
                self._add(sr)
            await self.send("PENDING", {"count": len(records)}, self._others(),
                            attachment=_json_list([sr.to_json() for sr in records]))
            self._wake.set()
            with anyio.move_on_after(wait):
                await waiter.event.wait()
        finally:
            self._waiters.pop(first, None)
        if waiter.block is None:
            stall = self.stall()
            detail = f": {stall['reason']}" if stall else " (more than a third may disagree)"
            raise BuildError(
                f"the build nodes did not reach consensus on this build within {wait:g} s"
                f"{detail}"
            )
        log.info(
            "Consensus latency: %d record(s) of %s committed in block %d %.1f ms "
            "after the build finished",
            len(records),
            ", ".join(sorted({sr.record.package_specific_id for sr in records})),
            waiter.block.block.height,
            (self.node.clock.monotonic() - started) * 1000,
        )
        return waiter.block

    # -- the machine's callbacks -------------------------------------------------------

    def _get_value(self, now: float) -> Block | None:
        """A proposal of this node's own pending records (the builds it made itself).

        Other build nodes' records are proposed only once this node rebuilt them itself
        and got the same hashes (``vouched``): a tampering build node's records never ride
        along in an honest proposal.
        """
        ledger = self.node.log_store.ledger
        own = self.node.node_id
        ready = [
            sr
            for sr in self.pending.values()
            if sr.record.node_id == own or sr.record.id in self.vouched
        ]
        if not ready:
            return None
        clock = self.node.clock.monotonic()
        records = self._quorum_vouched(ready, ledger.validators.ordered(),
                                       ledger.validators.threshold, clock)
        if not records:
            return None
        # Batching (Tendermint's timeout_commit, but only when it pays): while other
        # builds are on their way here -- pending, rebuilt by this node or under way,
        # not yet by a quorum -- hold ready records up to batch_wait, so one round
        # commits them together. A build alone is proposed at once.
        first_ready = min(self._ready_since.setdefault(sr.record.id, clock) for sr in records)
        if clock - first_ready < self.batch_wait and len(records) < 10_000:
            chosen = {sr.record.id for sr in records}
            validators = ledger.validators.ordered()
            if any(rid not in chosen
                   and not self._vouches_stalled(rid, self.vouchers.get(rid, set()),
                                                 validators, clock)
                   for rid in self.pending):
                return None
        records = records[:10_000]
        return ledger.propose(proposer=self.node.signer, records=records, timestamp=int(now))

    def _quorum_vouched(
        self, ready: list[SignedRecord], validators: list[str], quorum: int, clock: float
    ) -> list[SignedRecord]:
        """The ready records that one quorum of build nodes (this node among them) all
        rebuilt already -- so that quorum prevotes at once and the round commits.

        Records vouched by a quorum, but each by a different one, would not do: every
        build node would have something left to rebuild, and a round under load ends
        before they finish. The quorum chosen is the one that covers most records.
        Records whose vouches stalled (VOUCH messages lost, build nodes down or idle)
        are proposed all the same after vouch_wait; validators then rebuild them before
        they vote, as always.
        """
        own = self.node.node_id
        vouchers = [self.vouchers.get(sr.record.id, set()) for sr in ready]
        others = [v for v in validators if v != own]
        best: list[SignedRecord] = []
        need = quorum - 1
        if 0 <= need <= len(others):
            for count, group in enumerate(itertools.combinations(others, need)):
                if count >= 128:  # many build nodes: the first groups are enough
                    break
                q = set(group)
                chosen = [sr for sr, v in zip(ready, vouchers, strict=True) if q <= v]
                if len(chosen) > len(best):
                    best = chosen
        chosen_ids = {sr.record.id for sr in best}
        stalled = [
            sr for sr, v in zip(ready, vouchers, strict=True)
            if sr.record.id not in chosen_ids and self._vouches_stalled(sr.record.id, v,
                                                                         validators, clock)
        ]
        return best + stalled

    def _vouches_stalled(
        self, rid: str, vouchers: set[str], validators: list[str], clock: float
    ) -> bool:
        """Has ``rid`` waited vouch_wait, with no missing voucher still at work?

        A build node that sent a VOUCH within vouch_idle is working through its
        rebuilds (under a queue of builds, that takes longer than vouch_wait): its
        vouch is worth waiting for. One that is silent may be down or lost a message.
        """
        waited = clock - self._pending_since.get(rid, clock)
        if waited < self.vouch_wait:
            return False
        if waited >= self.vouch_max:
            return True  # busy build nodes that never vouch for it: do not wait forever
        return all(
            clock - self._last_vouch.get(v, float("-inf")) >= self.vouch_idle
            for v in validators if v not in vouchers
        )

    def _build_check(self, block: Block) -> bool | None:
        key = block.hash
        if key in self._checks:
            return self._checks[key]
        if any(sr.record.id in self._committed_ids for sr in block.records):
            log.warning("Proposed block %d repeats records already committed; voting nil",
                        block.height)
            self._checks[key] = False
            return False
        own = self.node.node_id
        if all(sr.record.node_id == own or sr.record.id in self.vouched for sr in block.records):
            # Every record is this node's own build or one it already rebuilt itself.
            self._checks[key] = True
            return True
        self._checks[key] = None
        if self._tg is not None:
            self._tg.start_soon(self._run_check, block)
        return None

    async def _run_check(self, block: Block) -> None:
        # Rebuilds of these records already under way (from PENDING) are awaited, not
        # repeated; only what this node has not rebuilt is rebuilt now.
        for sr in block.records:
            running = self._vouching.get(sr.record.id)
            if running is not None:
                await running.wait()
        own = self.node.node_id
        rest = tuple(
            sr for sr in block.records
            if sr.record.node_id != own and sr.record.id not in self.vouched
        )
        try:
            # This rebuild is what the vote waits for: it does not yield to consensus.
            with urgent():
                ok = True if not rest else await self.rebuild(attrs.evolve(block, records=rest))
        except Exception as exc:  # a failed rebuild is a "no", never a crash
            log.warning("Rebuild of block %d failed: %s", block.height, exc)
            ok = False
        self._checks[block.hash] = ok
        rebuilt = [sr.record.id for sr in rest if ok and sr.record.id in self.pending]
        if rebuilt:
            # A later proposal (another round, another proposer) holding these passes at
            # once, and the other build nodes count this node in their quorum.
            self.vouched.update(rebuilt)
            for rid in rebuilt:
                self.vouchers[rid].add(self.node.node_id)
            await self.send("VOUCH", {"records": rebuilt}, self._others())
        log.info(
            "Rebuilt the artifacts of proposed block %d: %s",
            block.height,
            "same hashes" if ok else "DIFFERENT hashes or failed; voting nil",
        )
        self._wake.set()

    # -- the loop ----------------------------------------------------------------------

    def _new_machine(self) -> TendermintMachine | None:
        ledger = self.node.log_store.ledger
        if self.node.node_id not in ledger.validators:
            return None
        return TendermintMachine(
            ledger_view=ledger,
            signer=self.node.signer,
            validators=ledger.validators,
            origin=ledger.origin,
            height=ledger.height + 1,
            timeouts=self.timeouts,
            build_check=self._build_check,
            get_value=self._get_value,
        )

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            while True:
                await self._run_height()

    def on_block(self, committed: CommittedBlock) -> None:
        """The ledger grew (a block from consensus, gossip or sync)."""
        self.node.priority.release()
        if len(self._committed_ids) > MAX_PENDING:
            for old in list(self._committed_ids)[: MAX_PENDING // 2]:
                del self._committed_ids[old]
        for sr in committed.block.records:
            self._committed_ids[sr.record.id] = None
            self.pending.pop(sr.record.id, None)
            self.vouched.discard(sr.record.id)
            self.vouchers.pop(sr.record.id, None)
            self._pending_since.pop(sr.record.id, None)
            self._ready_since.pop(sr.record.id, None)
            waiter = self._waiters.get(sr.record.id)
            if waiter is not None:
                waiter.block = committed
                waiter.event.set()
        self._wake.set()

    async def _run_height(self) -> None:
        height = self.node.log_store.ledger.height + 1
        machine = self._new_machine()
        self.machine = machine
        if machine is None:
            await self._sleep_until_woken(None)
            return
        resumed = False
        stored = await self.node.kv.get(SNAPSHOT_KEY)
        if stored is not None:
            try:
                snapshot = canonical_loads(stored)
                if snapshot.get("height") == height:
                    machine.restore(snapshot["state"])
                    resumed = True
                    log.info("Resumed consensus at height %d from the stored snapshot", height)
            except (EncodingError, ValueError, KeyError, TypeError, AttributeError) as exc:
                log.error("Ignoring an unreadable consensus snapshot: %s", exc)
        if not resumed:
            # Like Tendermint without empty blocks: a height starts (and its propose timer
            # runs) only once there is something to commit -- records pending here, or a
            # validator that already started this height. An idle network does not spin
            # through rounds whose timeouts grow, so a build arriving later meets round 0
            # with a fresh timer, and its proposer has the whole timeout to rebuild it.
            while (
                not self.pending
                and not self._started_elsewhere(height)
                and self.node.log_store.ledger.height < height
            ):
                await self._sleep_until_woken(None)
            if self.node.log_store.ledger.height >= height:
                return
        now = self.node.clock.now()
        self._height, self._height_since = height, self.node.clock.monotonic()
        try:
            await self._apply(machine.start(now))
            await self._decide(machine, height)
        finally:
            self._height = None

    async def _decide(self, machine: TendermintMachine, height: int) -> None:
        """Feed the height's machine until the ledger holds the block of ``height``."""
        while self.node.log_store.ledger.height < height:
            self._check_stall()
            inbox, self._inbox = self._inbox, []
            for sender, raw in inbox:
                try:
                    message = message_from_json(raw)
                except MessageError as exc:
                    log.warning("Ignored a consensus message from %s: %s", sender[:16], exc)
                    continue
                if message.height > height:
                    self._inbox.append((sender, raw))  # for a later height
                    continue
                log.debug("recv %s h%d r%d from %s", type(message).__name__, message.height,
                          getattr(message, "round", -1), sender[:8])
                if isinstance(message, Proposal):
                    self._proposed_at.setdefault(message.block_hash, self.node.clock.monotonic())
                    if message.height == height:
                        self.node.priority.hold(height)
                await self._apply(machine.receive(message, self.node.clock.now()))
                if self.node.log_store.ledger.height >= height:
                    return
            deadline = machine.next_deadline()
            now = self.node.clock.now()
            if deadline is not None and deadline <= now:
                await self._apply(machine.handle_timer(now))
                continue
            if self.pending and machine.step.value == "propose":
                await self._apply(machine.handle_timer(now))
            await self._sleep_until_woken(None if deadline is None else deadline - now)

    def stall(self) -> dict[str, Any] | None:
        """The height being decided, if it has waited ``stall_after`` or more: which
        build nodes sent nothing for it, how many are needed, and a sentence saying so."""
        if self._height is None:
            return None
        waited = self.node.clock.monotonic() - self._height_since
        if waited < self.stall_after:
            return None
        validators = self.node.log_store.ledger.validators
        silent = [v for v in validators.ordered()
                  if v != self.node.node_id and self._heard_height.get(v, -1) < self._height]
        needed = validators.threshold
        reason = (
            f"block {self._height} has waited {waited:.0f} s for a quorum ({needed} of "
            f"{len(validators)} build nodes must sign)"
        )
        if silent:
            reason += (f"; no word from build node(s) {', '.join(silent)}: down or "
                       "unreachable? Start them again")
        else:
            reason += "; every build node answers, but they do not agree yet"
        return {"height": self._height, "waiting_seconds": round(waited, 1),
                "needed": needed, "build_nodes": len(validators),
                "missing_build_nodes": silent, "reason": reason}

    def progress(self) -> tuple[int | None, int, dict[str, int]]:
        """For ``/metrics``: the height being decided (``None``: none), its round, and the
        highest consensus height each build node sent a message for."""
        machine = self.machine
        round_ = machine.round if machine is not None and self._height is not None else 0
        return self._height, round_, dict(self._heard_height)

    def _check_stall(self) -> None:
        stall = self.stall()
        now = self.node.clock.monotonic()
        if stall is not None and now - self._stall_logged >= self.stall_after:
            self._stall_logged = now
            log.warning("Consensus stalled: %s", stall["reason"])

    def _started_elsewhere(self, height: int) -> bool:
        """Has a consensus message for ``height`` (or later) arrived?"""
        return any(
            isinstance(raw, dict) and type(raw.get("height")) is int and raw["height"] >= height
            for _, raw in self._inbox
        )

    async def _sleep_until_woken(self, delay: float | None) -> None:
        with anyio.move_on_after(0.5 if delay is None else max(0.0, delay)):
            await self._wake.wait()
        self._wake = anyio.Event()

    async def _apply(self, out: Output) -> None:
        for message, reason in out.ignored:
            who = message.sender[:16] if message is not None else "?"
            # Duplicates are routine (re-broadcasts); anything else is worth a line.
            level = logging.DEBUG if "duplicate" in reason else logging.INFO
            log.log(level, "Consensus ignored a message from %s: %s", who, reason)
        for message in out.broadcast:
            if isinstance(message, Proposal):
                self._proposed_at.setdefault(message.block_hash, self.node.clock.monotonic())
                self.node.priority.hold(message.height)
        if out.broadcast and self.machine is not None:
            # Write-ahead: what this node signed is on disk before anyone sees it, so a
            # restarted build node resumes its round and lock and never equivocates.
            await self.node.kv.put(
                SNAPSHOT_KEY,
                canonical_json({"height": self.machine.height, "state": self.machine.snapshot()}),
            )
        if out.broadcast:
            others = self._others()
            # One request per validator for everything this input produced.
            for start in range(0, len(out.broadcast), MAX_CONSENSUS_BATCH):
                batch = out.broadcast[start : start + MAX_CONSENSUS_BATCH]
                log.debug("send %s", ", ".join(
                    f"{type(m).__name__} h{m.height} r{getattr(m, 'round', -1)}" for m in batch))
                # The messages travel as an attachment: each is signed by its author, and
                # the envelope's signature covers the attachment's SHA-256, so neither
                # side canonicalises a proposal's block again to sign or check it.
                await self.send("CONSENSUS", {"count": len(batch)}, others,
                                attachment=_json_list([m.to_json() for m in batch]))
        if out.committed is not None:
            await self._commit(out.committed)

    async def _commit(self, committed: CommittedBlock) -> None:
        try:
            await self.node.append_block(committed, own=True)
        except BlockError as exc:
            if committed.block.height <= self.node.log_store.ledger.height:
                return  # already appended (from gossip)
            log.error("Consensus decided a block the ledger rejects: %s", exc)
            return
        await self.node.kv.delete(SNAPSHOT_KEY)
        proposed = self._proposed_at.get(committed.block.hash)
        self._proposed_at.clear()
        log.info(
            "Consensus committed block %d (%d records) with a quorum certificate%s",
            committed.block.height,
            len(committed.block.records),
            "" if proposed is None
            else f", {(self.node.clock.monotonic() - proposed) * 1000:.1f} ms after its proposal",
        )
        for listener in self.node.commit_listeners:
            await listener(committed)
