"""Witnesses on a node: the C2SP tlog-witness endpoint, cosignature collection after each
commit, witness policies and split-view evidence.

- A node started with ``--witness-key`` is a witness for its network: it answers
  ``POST /witness/add-checkpoint`` (C2SP tlog-witness), keeping the latest checkpoint it
  cosigned in its KV store (checked and written under one lock, before it answers).
- A build node started with ``--witness URL,KEY`` asks those witnesses to cosign the
  checkpoint of every block it commits, and stores their cosignatures as further
  signature lines of the block's certificate (a C2SP signed note): peers get them with
  the block (gossip, sync) and ``inspect-log --proof`` shows them.
- A node started with ``--witness-policy KEY ... --witness-threshold K`` adopts blocks
  from peers only once a checkpoint with K valid cosignatures covers them, and serves
  only records covered by such a checkpoint.
- Two certified checkpoints for one network that cannot be one history are kept as
  evidence (``w/evidence/``), logged, and shown in the status.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import anyio
import attrs
import httpx
from pyrsia_core._witness import SIZE_CONTENT_TYPE
from pyrsia_core.errors import (
    BlockError,
    CheckpointError,
    NoteError,
    SignatureError,
    StoreError,
)

from pyrsia_core import (
    AddCheckpointRequest,
    Checkpoint,
    CommittedBlock,
    Cosigner,
    Ed25519Signer,
    LogKeys,
    NoteSignature,
    SignedNote,
    SplitView,
    StoredRecord,
    WitnessPolicy,
    WitnessRequestError,
    add_checkpoint,
    add_cosignatures,
    canonical_json,
    canonical_loads,
    find_split_view,
)

from ._asgi import Receive, Scope, Send, read_body, route_path, send_bytes

__all__ = ["WitnessApp", "WitnessService", "WitnessTarget", "parse_witness_target",
           "verify_witnessed"]

log = logging.getLogger("pyrsia.witness")
WITNESS_KEY_FILE: Final = "witness.key"
_LATEST: Final = b"w/latest/"
_EVIDENCE: Final = b"w/evidence/"
#: Largest add-checkpoint body accepted (a checkpoint note with its signatures).
MAX_REQUEST: Final = 256 * 1024
#: Split-view evidence kept (the first ones: later ones add little).
MAX_EVIDENCE: Final = 100
#: Seconds a build node waits for one witness's cosignature (the block is gossiped after:
#: a witness that does not answer delays its propagation by at most this).
COSIGN_TIMEOUT: Final = 3.0


@attrs.frozen
class WitnessTarget:
    """A witness a build node asks: its submission URL prefix and its key."""

    url: str
    cosigner: Cosigner


def parse_witness_target(text: str) -> WitnessTarget:
    """``URL,KEY`` with KEY the witness's vkey (``pyrsia status`` prints it) or NAME=HEX."""
    url, sep, key = text.partition(",")
    if not sep or not url.startswith(("http://", "https://")):
        raise ValueError(f"--witness {text!r:.200}: expected URL,KEY, e.g. "
                         "http://127.0.0.1:7888,pyrsia-witness/...+1a2b3c4d+BAbc...")
    return WitnessTarget(url.rstrip("/"), Cosigner.parse(key))


def _load_key(data: Path) -> Ed25519Signer:
    import os

    path = data / WITNESS_KEY_FILE
    if path.exists():
        return Ed25519Signer.from_pem(path.read_bytes())
    signer = Ed25519Signer.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, signer.to_pem())
        os.fsync(fd)
    finally:
        os.close(fd)
    return signer


@attrs.define(eq=False)
class WitnessService:
    node: Any
    #: This node's witness key and name (``--witness-key``), else ``None``.
    signer: Ed25519Signer | None = None
    name: str = ""
    targets: tuple[WitnessTarget, ...] = ()
    policy: WitnessPolicy | None = None
    evidence: list[SplitView] = attrs.Factory(list)
    #: The highest block whose stored certificate satisfies the policy (-1: none).
    trusted_height: int = -1
    #: Commit-to-cosigned latency of recent blocks (seconds), for the log and benchmarks.
    latencies: list[float] = attrs.Factory(list)
    _lock: anyio.Lock = attrs.Factory(anyio.Lock)
    _sizes: dict[str, int] = attrs.Factory(dict)  # witness URL -> size it last reported
    _client: httpx.AsyncClient | None = None
    #: The checkpoint this witness last cosigned for its network (when a witness).
    cosigned: Checkpoint | None = None

    @classmethod
    async def open(cls, node: Any) -> WitnessService:
        config = node.config
        signer = None
        if config.witness_key:
            signer = await anyio.to_thread.run_sync(_load_key, config.data_dir)
        service = cls(
            node,
            signer=signer,
            name=f"pyrsia-witness/{node.node_id}" if signer is not None else "",
            targets=tuple(config.witnesses),
            policy=config.witness_policy,
        )
        async for _key, raw in node.kv.scan(_EVIDENCE):
            try:
                service.evidence.append(SplitView.from_json(canonical_loads(raw)))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("Ignoring unreadable split-view evidence: %s", exc)
        if service.policy is not None:
            await service._find_trusted()
        if signer is not None:
            raw = await node.kv.get(_LATEST + node.log_store.ledger.origin.encode())
            if raw is not None:
                service.cosigned = Checkpoint.from_text(SignedNote.parse(raw).text)
        for ev in service.evidence:
            log.error("SPLIT VIEW of %s on record: %s", ev.origin, ev.reason)
        return service

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    @property
    def cosigner(self) -> Cosigner | None:
        return Cosigner(self.name, self.signer.public_key) if self.signer is not None else None

    def _known(self) -> list[Cosigner]:
        """Every witness key this node knows (its policy's and its targets')."""
        out = {t.cosigner.name: t.cosigner for t in self.targets}
        if self.policy is not None:
            out.update({c.name: c for c in self.policy.cosigners})
        return list(out.values())

    # -- the witness endpoint (tlog-witness add-checkpoint) ----------------------------

    async def handle_add_checkpoint(self, body: bytes) -> tuple[int, str, str]:
        """(status, content type, body) of one add-checkpoint request."""
        if self.signer is None:
            return 404, "text/plain; charset=utf-8", "this node is not a witness\n"
        try:
            request = AddCheckpointRequest.parse(body)
        except WitnessRequestError as exc:
            return 400, "text/plain; charset=utf-8", f"{exc}\n"
        ledger = self.node.log_store.ledger
        keys = LogKeys(ledger.origin, ledger.validators.verifiers(ledger.origin),
                       ledger.validators.threshold)
        key = _LATEST + ledger.origin.encode()
        held = await self._holds(request.note)
        async with self._lock:  # check and persist atomically (tlog-witness)
            raw = await self.node.kv.get(key)
            latest = SignedNote.parse(raw) if raw is not None else None
            out = add_checkpoint(request, latest=latest, log=keys, signer=self.signer,
                                 name=self.name, now=int(time.time()), log_signed=held)
            if out.state is not None:
                await self.node.kv.put(key, out.state.to_bytes())
                self.cosigned = Checkpoint.from_text(out.state.text)
        if out.evidence is not None:
            await self.record_evidence(out.evidence)
        if out.status not in (200, 409):
            log.info("Witness refused a checkpoint (%d): %s", out.status, out.body.strip())
        return out.status, out.content_type, out.body

    async def _holds(self, note: SignedNote) -> bool:
        """Is ``note`` the checkpoint of a block this node holds (certified when adopted)?
        Then it is the log's even if the build nodes changed since: the current ones would
        not verify it."""
        try:
            cp = Checkpoint.from_text(note.text)
        except CheckpointError:
            return False
        for line in cp.extensions:
            kind, _, rest = line.partition(" ")
            height_text, _, _ = rest.partition(" ")
            if kind == "block" and height_text.isdigit() and len(height_text) < 20:
                height = int(height_text)
                if height <= self.node.log_store.ledger.height:
                    stored = await self.node.log_store.certificate(height)
                    return stored is not None and stored.text == note.text
        return False

    async def record_evidence(self, evidence: SplitView) -> None:
        """Keep split-view evidence (bounded), and say so loudly."""
        if any(e.first == evidence.first and e.second == evidence.second
               for e in self.evidence):
            return
        log.error("SPLIT VIEW detected for network %s: %s. The first checkpoint stays "
                  "trusted; the newer one is refused. Evidence kept in the data directory "
                  "(pyrsia status shows it).", evidence.origin, evidence.reason)
        if len(self.evidence) >= MAX_EVIDENCE:
            return
        self.evidence.append(evidence)
        await self.node.kv.put(_EVIDENCE + struct.pack(">Q", len(self.evidence)),
                               canonical_json(evidence.to_json()))

    # -- a build node: collecting cosignatures --------------------------------------------

    async def after_commit(self, committed: CommittedBlock) -> CommittedBlock:
        """Ask the configured witnesses to cosign ``committed``'s checkpoint and store their
        cosignatures with it; the block with its cosigned certificate (for gossip)."""
        if not self.targets:
            return committed
        started = time.perf_counter()
        lines: list[NoteSignature] = []

        async def one(target: WitnessTarget) -> None:
            try:
                with anyio.fail_after(COSIGN_TIMEOUT):
                    sig = await self._cosign(target, committed)
            except (TimeoutError, httpx.HTTPError, ValueError, NoteError, SignatureError) as exc:
                log.warning("Witness %s did not cosign block %d: %s", target.cosigner.name,
                            committed.block.height, str(exc) or type(exc).__name__)
                return
            if sig is not None:
                lines.append(sig)

        async with anyio.create_task_group() as tg:
            for target in self.targets:
                tg.start_soon(one, target)
        published = (await self.merge(committed.block.height, lines) if lines else None
                     ) or committed
        elapsed = time.perf_counter() - started
        self.latencies = [*self.latencies[-999:], elapsed]
        log.info("Witnesses cosigned block %d: %d of %d, stored %.1f ms after the commit",
                 committed.block.height, len(lines), len(self.targets), elapsed * 1000)
        return published

    async def _cosign(self, target: WitnessTarget, committed: CommittedBlock
                      ) -> NoteSignature | None:
        if self._client is None:
            self._client = httpx.AsyncClient(trust_env=False, timeout=COSIGN_TIMEOUT)
        size = committed.block.tree_size
        old = self._sizes.get(target.url, 0)
        conflicts = lagging = 0
        while True:
            if old > size:
                raise ValueError(f"the witness holds a larger tree ({old}) than block "
                                 f"{committed.block.height} ({size})")
            proof = self.node.log_store.consistency_proof(old, size) if 0 < old < size else []
            body = AddCheckpointRequest(old, tuple(proof), committed.certificate).to_bytes()
            resp = await self._client.post(f"{target.url}/witness/add-checkpoint", content=body)
            if resp.status_code == 409 and resp.headers.get("content-type", "").startswith(
                    SIZE_CONTENT_TYPE):
                text = resp.text.strip()
                conflicts += 1
                if not text.isdigit() or int(text) == old or conflicts > 2:
                    raise ValueError(f"the witness refused the checkpoint: 409 {text[:80]}")
                old = self._sizes[target.url] = int(text)  # once more, from its size
                continue
            if resp.status_code == 403 and lagging < 5:
                # The witness may not know the build nodes of this height yet (it is a node
                # of the network, and the block before, which changed them, is on its way).
                await anyio.sleep(0.1 * 2**lagging)
                lagging += 1
                continue
            if resp.status_code != 200:
                raise ValueError(f"HTTP {resp.status_code}: {resp.text.strip()[:200]}")
            self._sizes[target.url] = size
            for line in resp.text.splitlines():
                try:
                    sig = NoteSignature.from_line(line)
                    if target.cosigner.matches(sig):
                        target.cosigner.verify(committed.certificate.text, sig)
                        return sig
                except (NoteError, SignatureError, ValueError) as exc:
                    raise ValueError(f"the witness answered a bad cosignature: {exc}") from None
            raise ValueError("the witness answered no cosignature of its key")

    async def merge(self, height: int, lines: Sequence[NoteSignature]) -> CommittedBlock | None:
        """Add cosignature ``lines`` to the stored certificate of block ``height``."""
        async with self.node._commit_lock:
            stored = await self.node.log_store.block(height)
            if stored is None:
                return None
            cert = add_cosignatures(stored.certificate, lines)
            if cert is not stored.certificate:
                await self.node.log_store.set_certificate(height, cert)
            if self.policy is not None and height > self.trusted_height and (
                    self.policy.satisfied(cert)):
                self.trusted_height = height
            return CommittedBlock(stored.block, cert)

    # -- any node: blocks from peers ----------------------------------------------------

    def check_block(self, committed: CommittedBlock, *, covered: bool = False) -> None:
        """Refuse a block this node must not adopt (:class:`BlockError`, rule ``witness``):
        on a witness, one of the size it cosigned with another root; with a policy, a
        peer's block whose checkpoint lacks K cosignatures (unless ``covered`` by a later
        witnessed one, or decided by this node's own consensus)."""
        held = self.cosigned
        block = committed.block
        if held is not None and block.tree_size == held.size and bytes.fromhex(
                block.root) != held.root:
            raise BlockError("witness", f"block {block.height} has another root for tree size "
                             f"{held.size} than the checkpoint this witness cosigned: a split "
                             "view")
        if self.policy is None or covered:
            return
        valid = self.policy.valid(committed.certificate)
        if len(valid) < self.policy.threshold:
            raise BlockError("witness", f"block {committed.block.height} is not witnessed: "
                             + self.policy.shortfall(len(valid)))

    def covered(self, batch: list[CommittedBlock]) -> list[CommittedBlock]:
        """The blocks of a synced ``batch`` a policy lets in: up to its last block whose
        checkpoint has K cosignatures (that checkpoint covers the ones before it)."""
        if self.policy is None:
            return batch
        for i in range(len(batch) - 1, -1, -1):
            if self.policy.satisfied(batch[i].certificate):
                return batch[: i + 1]
        return []

    def adopted(self, committed: CommittedBlock) -> None:
        if self.policy is not None and self.policy.satisfied(committed.certificate):
            self.trusted_height = max(self.trusted_height, committed.block.height)

    async def observe(self, committed: CommittedBlock) -> None:
        """A certified block at a height this node holds already: merge its cosignatures
        if it is the same block; keep split-view evidence if it is another."""
        height = committed.block.height
        stored = await self.node.log_store.block(height)
        if stored is None:
            return
        if stored.block.hash == committed.block.hash:
            known = self._known()
            lines = [s for s in committed.certificate.signatures
                     if any(c.matches(s) for c in known)]
            if lines and len(add_cosignatures(stored.certificate, lines).signatures) > len(
                    stored.certificate.signatures):
                valid = [s for s in lines if any(_valid(c, committed.certificate.text, s)
                                                 for c in known)]
                if valid:
                    await self.merge(height, valid)
            return
        try:
            self.node.log_store.ledger.check_certificate(committed)
        except BlockError:
            return  # not certified by the build nodes: garbage, not evidence
        first, second = stored.certificate, committed.certificate
        a, b = Checkpoint.from_text(first.text), Checkpoint.from_text(second.text)
        if a.size > b.size:
            first, second = second, first
        evidence = find_split_view(first, second, None, seen_at=int(time.time()))
        if evidence is None:
            tree = self.node.log_store.ledger.tree
            small = min(a.size, b.size)
            reason = (f"two blocks certified at height {height} "
                      f"({stored.block.hash[:16]}…, {committed.block.hash[:16]}…)")
            if small <= tree.size and tree.root(small) != (a if a.size == small else b).root:
                reason += f"; their trees differ at size {small}"
            evidence = SplitView(a.origin, stored.certificate.to_text(),
                                 committed.certificate.to_text(), reason, int(time.time()))
        else:
            evidence = attrs.evolve(evidence, first=stored.certificate.to_text(),
                                    second=committed.certificate.to_text())
        await self.record_evidence(evidence)

    # -- serving ----------------------------------------------------------------------------

    def visible(self, records: list[StoredRecord], what: str) -> list[StoredRecord]:
        """Records a policy lets this node serve: those a witnessed checkpoint covers.
        Hidden ones are left out (every package type then answers "not in the log"), and
        the log says that the policy hid them."""
        if self.policy is None or not records:
            return records
        shown = [r for r in records if r.height <= self.trusted_height]
        if len(shown) < len(records):
            names = ", ".join(c.name for c in self.policy.cosigners)
            log.info("%d record(s) of %s not served: no checkpoint with %d witness "
                     "cosignatures covers them yet (witness policy: %d of %s)",
                     len(records) - len(shown), what, self.policy.threshold,
                     self.policy.threshold, names)
        return shown

    async def _find_trusted(self) -> None:
        assert self.policy is not None
        for height in range(self.node.log_store.ledger.height, -1, -1):
            cert = await self.node.log_store.certificate(height)
            if cert is not None and self.policy.satisfied(cert):
                self.trusted_height = height
                return

    def status(self) -> dict[str, Any]:
        me = self.cosigner
        return {
            "witness": None if me is None else me.to_json(),
            "witnesses": [{"url": t.url, **t.cosigner.to_json()} for t in self.targets],
            "witness_policy": None if self.policy is None else {
                **self.policy.to_json(), "trusted_height": self.trusted_height},
            # The first ones in full (the rest are in the data dir), and how many in all.
            "split_views": [e.to_json() for e in self.evidence[:10]],
            "split_view_count": len(self.evidence),
        }


def _valid(c: Cosigner, text: str, sig: NoteSignature) -> bool:
    try:
        c.verify(text, sig)
    except (NoteError, SignatureError):
        return False
    return True


@attrs.define(eq=False)
class WitnessApp:
    """``POST /witness/add-checkpoint`` (C2SP tlog-witness)."""

    service: WitnessService

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope).rstrip("/")
        text = "text/plain; charset=utf-8"
        if path != "/witness/add-checkpoint":
            await send_bytes(send, 404, b"no such witness endpoint\n", content_type=text)
            return
        if scope["method"] != "POST":
            await send_bytes(send, 405, b"add-checkpoint takes POST\n", [("allow", "POST")],
                             content_type=text)
            return
        try:
            body = await read_body(receive, MAX_REQUEST)
        except ValueError as exc:
            await send_bytes(send, 413, f"{exc}\n".encode(), content_type=text)
            return
        try:
            status, content_type, answer = await self.service.handle_add_checkpoint(body)
        except (StoreError, OSError, NoteError, CheckpointError) as exc:
            log.error("Witness could not keep or read its state: %s", exc)
            status, content_type, answer = 503, text, "the witness cannot store its state\n"
        await send_bytes(send, status, answer.encode(), content_type=content_type)


async def verify_witnessed(data_dir: Path, package_type: str, package: str,
                           policy: WitnessPolicy) -> tuple[int, frozenset[str]]:
    """For ``pyrsia verify --witness-policy``: the height of the newest stored checkpoint
    with the policy's cosignatures that covers every record of the package, and the
    witnesses that cosigned it. Run after :func:`verify_offline` (which replays and
    checks the ledger); raises :class:`VerifyFailed` if no such checkpoint is stored."""
    import shutil
    import tempfile

    from pyrsia_storage_leveldb import LevelDBStore

    from pyrsia_core import LogStore

    from ._verify_offline import VerifyFailed, _package

    record_type, package_id = _package(package_type, package)

    with tempfile.TemporaryDirectory(prefix="pyrsia-verify-") as tmp:
        copy = Path(tmp) / "ledger"
        shutil.copytree(data_dir / "ledger", copy, ignore=shutil.ignore_patterns("LOCK"))
        kv = LevelDBStore(copy)
        try:
            store = await LogStore.open(kv)
            records = await store.records_for_package(record_type, package_id)
            if not records:
                raise VerifyFailed(f"no log record for {package_id}")
            lowest = max(r.height for r in records)
            tree = store.ledger.tree
            for height in range(store.ledger.height, lowest - 1, -1):
                cert = await store.certificate(height)
                if cert is None:
                    continue
                names = frozenset(policy.valid(cert))
                if len(names) < policy.threshold:
                    continue
                cp = Checkpoint.from_text(cert.text)
                if cp.size > tree.size or tree.root(cp.size) != cp.root:
                    raise VerifyFailed(f"the witnessed checkpoint of block {height} does not "
                                       "match the ledger")
                return height, names
        finally:
            await kv.aclose()
    witnesses = ", ".join(c.name for c in policy.cosigners)
    raise VerifyFailed(f"no checkpoint with {policy.threshold} valid cosignatures of the "
                       f"witness policy ({witnesses}) covers the records of {package_id}")
