"""The node runtime: stores, identity, ledger, builds and verified artifact access.

The node drives the pure core (:mod:`pyrsia_core`) with real I/O: it opens the
plugins named in its configuration, keeps its key and admin token in the data
directory, and -- as a build node -- fetches images from its upstream, verifies
every digest, stores them and commits one block of log records per build.
"""

from __future__ import annotations

import contextvars
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import attrs
from pyrsia_core.errors import (
    BlobNotFound,
    PyrsiaError,
    QuotaExceeded,
    StoreError,
    UsageError,
)
from pyrsia_core.interfaces import BlobInfo, BlobStore, KeyValueStore, SystemClock, Upstream

from pyrsia_core import (
    PARTS_RECORD_TYPE,
    Block,
    CommittedBlock,
    Digest,
    Ed25519Signer,
    LogStore,
    PartHasher,
    PartList,
    Record,
    SignedRecord,
    StoredRecord,
    make_genesis,
)
from pyrsia_core import plugins as core_plugins

from ._config import DEFAULT_DISK_SPACE, NodeConfig, load_settings, parse_size, save_settings
from ._priority import ConsensusPriority
from ._verify import ParallelRecordVerifier

__all__ = ["Build", "BuildError", "Node", "NotInLog", "check_data_dir"]

log = logging.getLogger("pyrsia.node")


class BuildError(PyrsiaError):
    """A build failed; nothing of it was committed."""


class NotInLog(PyrsiaError, LookupError):
    """No log record vouches for the requested artifact."""


@attrs.define
class Build:
    """One build of a package: its id, status (RUNNING, SUCCESS, FAILED), reason and block."""

    id: str
    package_type: str
    package_id: str
    #: RUNNING, WAITING_FOR_QUORUM (built; the build nodes have not committed it yet),
    #: SUCCESS, FAILED.
    status: str = "RUNNING"
    reason: str = ""
    started: float = attrs.Factory(time.time)
    finished: float | None = None
    #: While WAITING_FOR_QUORUM: when the build fails unless the build nodes commit it.
    deadline: float | None = None
    records: int = 0
    height: int | None = None
    done: anyio.Event = attrs.field(factory=anyio.Event, repr=False)
    #: Set once the build has fetched and verified its top-level artifact (for Docker:
    #: the manifests), so a waiting client can be answered before the whole build ends.
    ready: anyio.Event = attrs.field(factory=anyio.Event, repr=False)
    result: Any = attrs.field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "build_id": self.id,
            "package_type": self.package_type,
            "package_specific_id": self.package_id,
            "status": self.status,
            "reason": self.reason,
            "started": int(self.started),
            "finished": int(self.finished) if self.finished else None,
            "deadline": int(self.deadline) if self.deadline else None,
            "records": self.records,
            "ledger_height": self.height,
        }


#: The build running in this task (its commit waits for the quorum under its name).
current_build: contextvars.ContextVar[Build | None] = contextvars.ContextVar(
    "pyrsia_current_build", default=None
)


def check_data_dir(data: Path) -> None:
    """Raise :class:`UsageError` naming ``data`` if a node cannot keep its data there.

    Creates nothing: a start that fails leaves no half-made data directory behind.
    """
    probe = data
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe != data and probe.exists() and not probe.is_dir():
        raise UsageError(f"cannot use the data directory {data}: {probe} is not a directory")
    if probe == data and not data.is_dir():
        raise UsageError(f"cannot use the data directory {data}: it is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "it is" if probe == data else f"{probe} is"
        raise UsageError(f"cannot use the data directory {data}: {what} not writable")


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


@attrs.define(eq=False)
class Node:
    """A pyrsia node. ``async with Node.open(config)`` or ``await node.aclose()``."""

    config: NodeConfig
    signer: Ed25519Signer
    admin_token: str
    kv: KeyValueStore
    blobs: BlobStore
    log_store: LogStore
    upstream: Upstream | None
    clock: SystemClock = attrs.Factory(SystemClock)
    builds: dict[str, Build] = attrs.Factory(dict)
    _inflight: dict[tuple[str, str], Build] = attrs.Factory(dict)
    _commit_lock: anyio.Lock = attrs.Factory(anyio.Lock)
    _fetch_locks: dict[str, anyio.Lock] = attrs.Factory(dict)
    package_types: dict[str, Any] = attrs.Factory(dict)
    listen_urls: list[str] = attrs.Factory(list)
    #: Called (in the node's task group) with every block this node commits itself.
    commit_listeners: list[Callable[[CommittedBlock], Awaitable[None]]] = attrs.Factory(list)
    peers: Any = None  # the PeerService, when the node talks to peers
    consensus: Any = None  # the ConsensusRunner, on a build node among several
    #: Handles a BUILD_REQUEST from a peer (set by the runtime): body -> build status.
    build_request_handler: Any = None
    #: Blobs of at least this many bytes get a logged part list (swarm fetch).
    part_threshold: int = 8 << 20
    #: Builds and background rebuilds wait here while the build nodes decide a height.
    priority: ConsensusPriority = attrs.Factory(
        lambda self: ConsensusPriority(self.clock), takes_self=True
    )

    # -- lifecycle -----------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        config: NodeConfig,
        *,
        genesis_source: Callable[[], Awaitable[CommittedBlock]] | None = None,
    ) -> Node:
        """Open (or create) the node's data directory.

        A new data directory gets the network's genesis from ``genesis_source`` (a
        node joining peers), or else a genesis of its own: a network of one.
        """
        data = config.data_dir
        await anyio.to_thread.run_sync(check_data_dir, data)
        try:
            await anyio.to_thread.run_sync(lambda: data.mkdir(parents=True, exist_ok=True))
        except OSError as exc:
            raise UsageError(f"cannot create the data directory {data}: "
                             f"{exc.strerror or exc}") from None
        settings = await anyio.to_thread.run_sync(load_settings, data)
        if config.disk_space is None:
            disk = settings.get("disk_space") or parse_size(DEFAULT_DISK_SPACE)
        else:
            disk = config.disk_space
            if settings.get("disk_space") != disk:
                await anyio.to_thread.run_sync(lambda: save_settings(data, disk_space=disk))
        config = attrs.evolve(config, disk_space=disk)
        signer = await anyio.to_thread.run_sync(cls._load_identity, data)
        token = await anyio.to_thread.run_sync(cls._load_token, data)
        kv: KeyValueStore = core_plugins.create(
            "pyrsia.kv_store", config.kv_store, {"path": str(data / "ledger")}
        )
        try:
            blobs: BlobStore = core_plugins.create(
                "pyrsia.blob_store",
                config.blob_store,
                {"path": str(data / "blobs"), "quota_bytes": str(config.disk_space)},
            )
            if hasattr(blobs, "open_store"):
                await blobs.open_store()
            genesis = None
            if await kv.get(b"h") is None:
                if genesis_source is not None:
                    genesis = await genesis_source()
                else:
                    genesis = make_genesis(
                        origin=f"pyrsia/{signer.node_id[:16]}",
                        validators=[signer],
                        timestamp=int(time.time()),
                    )
                    log.info(
                        "Created a new network of one (genesis, build node %s)", signer.node_id
                    )
            log_store = await LogStore.open(kv, genesis, record_verifier=ParallelRecordVerifier())
        except BaseException:
            await kv.aclose()
            raise
        upstream: Upstream | None = None
        if config.upstream:
            upstream = core_plugins.create("pyrsia.upstream", "registry", {"url": config.upstream})
        node = cls(
            config=config,
            signer=signer,
            admin_token=token,
            kv=kv,
            blobs=blobs,
            log_store=log_store,
            upstream=upstream,
        )
        for name in core_plugins.available("pyrsia.package_type"):
            try:
                node.package_types[name] = core_plugins.create(
                    "pyrsia.package_type", name, config.package_options.get(name, {})
                )
            except Exception as exc:  # a broken plugin is left out; the node still starts
                log.error("package type plugin %r failed to load: %s: %s", name,
                          type(exc).__name__, exc)
        log.info(
            "Node %s ready: ledger height %d, %d records, data in %s",
            signer.node_id,
            log_store.ledger.height,
            log_store.ledger.tree.size,
            data,
        )
        return node

    @staticmethod
    def _load_identity(data: Path) -> Ed25519Signer:
        path = data / "node.key"
        if path.exists():
            return Ed25519Signer.from_pem(path.read_bytes())
        signer = Ed25519Signer.generate()
        _write_private(path, signer.to_pem())
        return signer

    @staticmethod
    def _load_token(data: Path) -> str:
        path = data / "admin.token"
        if path.exists():
            return path.read_text().strip()
        token = secrets.token_urlsafe(32)
        _write_private(path, token.encode() + b"\n")
        return token

    @property
    def disk_space(self) -> int:
        """The bytes of disk the node may use for artifacts (its blob store's quota)."""
        return self.config.disk_space or parse_size(DEFAULT_DISK_SPACE)

    async def set_disk_space(self, size: int) -> int:
        """Change the disk quota now and for later starts; evicts (LRU) down to it.

        Returns the bytes evicted.
        """
        before = await self.blobs.usage()
        self.config.disk_space = size
        self.blobs.quota = size
        await anyio.to_thread.run_sync(
            lambda: save_settings(self.config.data_dir, disk_space=size))
        await self.make_room(0)
        evicted = max(0, before - await self.blobs.usage())
        log.info("Disk space set to %d bytes (%d bytes evicted to fit)", size, evicted)
        return evicted

    async def aclose(self) -> None:
        close = getattr(self.log_store.ledger.record_verifier, "close", None)
        if close is not None:
            close()
        with anyio.CancelScope(shield=True):
            if self.upstream is not None:
                await self.upstream.aclose()
            await self.blobs.aclose()
            await self.kv.aclose()

    async def __aenter__(self) -> Node:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def inflight(self) -> dict[tuple[str, str], Build]:
        """Builds running now, by (package type, package id)."""
        return self._inflight

    @property
    def node_id(self) -> str:
        return self.signer.node_id

    @property
    def is_build_node(self) -> bool:
        return self.node_id in self.log_store.ledger.validators

    # -- the log -------------------------------------------------------------------

    async def records_for_package(self, package_type: str, package_id: str) -> list[StoredRecord]:
        return await self.log_store.records_for_package(package_type, package_id)

    async def records_for_artifact(self, digest: Digest) -> list[StoredRecord]:
        return await self.log_store.records_for_artifact(digest.hex)

    async def commit(self, records: list[Record]) -> CommittedBlock:
        """Sign records, propose a block and commit it (a network of one commits alone)."""
        if not self.is_build_node:
            raise BuildError("this node is not an authorized build node")
        if len(self.log_store.ledger.validators) > 1:
            if self.consensus is None:
                raise BuildError("committing with several build nodes needs consensus")
            signed = [SignedRecord.sign(r, self.signer) for r in records]
            build = current_build.get()
            if build is not None:
                build.status = "WAITING_FOR_QUORUM"
                build.deadline = time.time() + self.config.consensus_timeout
            committed = await self.consensus.submit(signed, wait=self.config.consensus_timeout)
            log.info("Build records committed by consensus in block %d", committed.block.height)
            return committed  # type: ignore[no-any-return]
        async with self._commit_lock:
            ledger = self.log_store.ledger
            signed = [SignedRecord.sign(r, self.signer) for r in records]
            block = ledger.propose(
                proposer=self.signer, records=signed, timestamp=int(self.clock.now())
            )
            committed = CommittedBlock(block, ledger.sign_block(block, self.signer))
            await self.log_store.append(committed, now=self.clock.now())
            for listener in self.commit_listeners:
                await listener(committed)
            log.info(
                "Committed block %d with %d record(s), log size %d",
                block.height,
                len(records),
                block.tree_size,
            )
            return committed

    async def append_block(self, committed: CommittedBlock) -> None:
        """Validate and store a block committed elsewhere (from a peer or consensus)."""
        async with self._commit_lock:
            ledger = self.log_store.ledger
            now = self.clock.now()
            if len(committed.block.records) > 256:
                # Big blocks (ledger sync): validate in a worker thread, so the event loop
                # keeps serving -- and keeps fetching the next blocks -- meanwhile.
                leaves = await anyio.to_thread.run_sync(
                    lambda: ledger.validate(committed, now=now)
                )
                if self.log_store.ledger is not ledger:
                    raise StoreError("the ledger was reloaded while a block was validated")
                await self.log_store.append(committed, now=now, validated=lambda: leaves)
            else:
                await self.log_store.append(committed, now=now)
        if self.consensus is not None:
            self.consensus.on_block(committed)

    async def handle_build_request(self, body: Any) -> dict[str, Any]:
        if self.build_request_handler is None:
            raise BuildError("this node takes no build requests")
        return await self.build_request_handler(body)  # type: ignore[no-any-return]

    # -- builds --------------------------------------------------------------------

    def start_build(
        self,
        package_type: str,
        package_id: str,
        run: Callable[[Build], Any],
        task_group: Any,
    ) -> Build:
        """Start (or join) the build of ``package_id``; ``run`` does the work."""
        key = (package_type, package_id)
        existing = self._inflight.get(key)
        if existing is not None:
            return existing
        build = Build(id=str(uuid.uuid4()), package_type=package_type, package_id=package_id)
        self.builds[build.id] = build
        self._inflight[key] = build

        async def runner() -> None:
            current_build.set(build)
            try:
                height = await run(build)
                build.status, build.height = "SUCCESS", height
            except Exception as exc:  # a build failure is reported, never crashes the node
                build.status = "FAILED"
                build.reason = str(exc) or type(exc).__name__
                if not isinstance(exc, PyrsiaError):
                    log.exception("build %s of %s crashed", build.id, package_id)
                else:
                    log.warning("Build of %s failed: %s", package_id, build.reason)
            finally:
                build.finished = time.time()
                build.deadline = None
                self._inflight.pop(key, None)
                build.ready.set()
                build.done.set()

        task_group.start_soon(runner)
        return build

    # -- blobs ---------------------------------------------------------------------

    async def store_stream(
        self, chunks: AsyncIterator[bytes], expected: Digest, size: int | None
    ) -> BlobInfo:
        """Verify and store a blob, first evicting least-recently-used blobs if needed."""
        if size is not None:
            await self.make_room(size)
        return await self.blobs.put(chunks, expected=expected, expected_size=size)

    async def make_room(self, needed: int) -> None:
        """Evict least-recently-used blobs until ``needed`` more bytes fit in the quota.

        Every stored blob is in the log, so an evicted one can be fetched again.
        Raises :class:`QuotaExceeded` if the blob is larger than the whole quota.
        """
        quota = self.blobs.quota
        if quota is None:
            return
        if needed > quota:
            raise QuotaExceeded(f"a blob of {needed} bytes is larger than the disk quota ({quota})")
        free = quota - await self.blobs.usage()
        if free >= needed:
            return
        lru = getattr(self.blobs, "lru_digests", None)
        if lru is None:
            return
        async for digest in lru():
            info = await self.blobs.stat(digest)
            if info is not None and await self.blobs.delete(digest):
                free += info.size
                log.info("Evicted %s (%d bytes) to stay within the disk quota", digest, info.size)
            if free >= needed:
                return

    async def touch(self, digest: Digest) -> None:
        touch = getattr(self.blobs, "touch", None)
        if touch is not None:
            try:
                await touch(digest)
            except (StoreError, BlobNotFound):
                pass

    # -- part lists (swarm fetch of large blobs) ------------------------------------

    async def part_list(self, digest: Digest) -> PartList:
        """The part list of a stored blob, read from the store (its document is stored
        too, so this node serves it). Parts are of the protocol's fixed size, so every
        node computes the same list."""
        hasher = PartHasher()
        async for chunk in self.blobs.open(digest):
            hasher.update(chunk)
        parts = hasher.finish(digest)
        if await self.blobs.stat(parts.digest) is None:
            await self.blobs.put_bytes(parts.to_bytes(), expected=parts.digest)
        return parts

    async def part_list_records(self, digests: list[Digest], timestamp: int) -> list[Record]:
        """Records logging the part lists of the large blobs among ``digests``."""
        out: list[Record] = []
        for digest in dict.fromkeys(digests):
            info = await self.blobs.stat(digest)
            if info is None or info.size < self.part_threshold:
                continue
            parts = await self.part_list(digest)
            out.append(Record.new(
                signer=self.signer, package_type=PARTS_RECORD_TYPE,
                package_specific_id=str(digest),
                package_specific_artifact_id=f"{digest}#parts",
                artifact_hash=parts.digest.hex, num_artifacts=1, timestamp=timestamp,
            ))
        return out

    async def check_part_lists(self, block: Block) -> bool:
        """A validator's check of the part-list records in ``block``: the list of its own
        copy of each blob must hash to the logged value."""
        for sr in block.records:
            r = sr.record
            if r.package_type != PARTS_RECORD_TYPE:
                continue
            try:
                digest = Digest.parse(r.package_specific_id)
            except ValueError:
                return False
            if await self.blobs.stat(digest) is None:
                log.warning("Cannot check the part list of %s: this node does not hold it",
                            digest)
                return False
            claimed = r.artifact_hash
            mine = await self.part_list(digest)
            if mine.digest.hex != claimed:
                log.warning("Proposal claims a part list for %s that differs from this "
                            "node's", digest)
                return False
        return True

    async def local_blob(self, digest: Digest) -> BlobInfo | None:
        return await self.blobs.stat(digest)

    def fetch_lock(self, digest: Digest) -> anyio.Lock:
        lock = self._fetch_locks.get(digest.hex)
        if lock is None:
            lock = self._fetch_locks[digest.hex] = anyio.Lock()
        return lock

    async def status(self) -> dict[str, Any]:
        ledger = self.log_store.ledger
        usage = await self.blobs.usage()
        artifacts = await self.blobs.count()
        return {
            "node_id": self.node_id,
            "node_public_key": self.signer.public_key.hex,
            "peer_addresses": list(self.listen_urls),
            "peers_count": len(self.peers.table) if self.peers is not None else 0,
            "peers": self.peers.peers() if self.peers is not None else [],
            "artifact_count": artifacts,
            "log_records": ledger.tree.size,
            "disk_allocated": self.disk_space,
            "disk_usage": usage,
            "ledger_height": ledger.height,
            "ledger_head": ledger.head_hash,
            "network_origin": ledger.origin,
            "authorized_build_nodes": list(ledger.validators.ordered()),
            "is_build_node": self.is_build_node,
            "upstream": self.config.upstream,
            "consensus_stall": self.consensus.stall() if self.consensus is not None else None,
        }

    def build_json(self, build: Build) -> dict[str, Any]:
        """A build's status as the node API shows it (with why a quorum is missing)."""
        out = build.to_json()
        if build.status == "WAITING_FOR_QUORUM" and self.consensus is not None:
            stall = self.consensus.stall()
            if stall is not None:
                out["reason"] = stall["reason"]
        return out
