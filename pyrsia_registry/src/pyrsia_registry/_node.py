"""The node runtime: stores, identity, ledger, builds and verified artifact access.

The node drives the pure core (:mod:`pyrsia_core`) with real I/O: it opens the
plugins named in its configuration, keeps its key and admin token in the data
directory, and -- as a build node -- fetches images from its upstream, verifies
every digest, stores them and commits one block of log records per build.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio
import attrs
from pyrsia_core.errors import (
    BlobNotFound,
    BuildsBusy,
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
    provenance,
)
from pyrsia_core import plugins as core_plugins

from ._activity import Activity
from ._config import DEFAULT_DISK_SPACE, NodeConfig, load_settings, parse_size, save_settings
from ._priority import ConsensusPriority
from ._receiving import Receiving, file_reader, partial_path, receive
from ._verify import ParallelRecordVerifier

__all__ = ["Build", "BuildError", "BuildQueueFull", "Node", "NotInLog", "check_data_dir"]

log = logging.getLogger("pyrsia.node")
#: Shortest admin token accepted from ``admin.token`` (generated ones have 43 characters).
MIN_ADMIN_TOKEN = 16
#: Builds running at once; more wait in the queue.
MAX_RUNNING_BUILDS = 8
#: Builds running or queued at once; a request for another is refused (429).
MAX_QUEUED_BUILDS = 64
#: Finished builds kept for ``/api/builds/<id>``: the latest ones...
KEEP_FINISHED_BUILDS = 256
#: ... and any younger than this many seconds (up to a hard cap).
KEEP_FINISHED_SECONDS = 600.0
MAX_FINISHED_BUILDS = 4096
#: A stored blob is re-hashed on a reported mismatch at most this often.
RECHECK_INTERVAL = 30.0


#: Blobs of at most this many bytes (declared) are stored whole, not streamed to clients
#: while they arrive (manifests, configs).
SMALL_BLOB = 64 * 1024


_T = TypeVar("_T")
_background: ThreadPoolExecutor | None = None


def _lower_priority() -> None:
    """The background thread runs at the lowest CPU priority (Linux: per thread)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


async def in_background(func: Callable[[], _T]) -> _T:
    """Run ``func`` in the node's one low-priority thread (work no client waits for:
    part lists of what a build fetched), so that it takes the CPU the rest leaves."""
    global _background
    if _background is None:
        _background = ThreadPoolExecutor(1, thread_name_prefix="pyrsia-background",
                                         initializer=_lower_priority)
    future = _background.submit(func)
    return await anyio.to_thread.run_sync(future.result)


class BuildError(PyrsiaError):
    """A build failed; nothing of it was committed."""


class NotInLog(PyrsiaError, LookupError):
    """No log record vouches for the requested artifact."""


class BuildQueueFull(BuildError, BuildsBusy):
    """Too many builds are running or queued: the request is refused, try again later."""


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
    #: The class of the exception that failed the build (not the exception: its
    #: traceback would keep the failed build's memory alive).
    error_type: type[BaseException] | None = attrs.field(default=None, repr=False)

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


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


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
    #: The WitnessService (witness endpoint, cosignature collection, witness policy).
    witnesses: Any = None
    #: Handles a BUILD_REQUEST from a peer (set by the runtime): body -> build status.
    build_request_handler: Any = None
    #: Blobs of at least this many bytes get a logged part list (swarm fetch).
    part_threshold: int = 8 << 20
    #: Builds and background rebuilds wait here while the build nodes decide a height.
    priority: ConsensusPriority = attrs.Factory(
        lambda self: ConsensusPriority(self.clock), takes_self=True
    )
    #: Builds that may run at once (the others of ``inflight`` wait their turn).
    build_slots: anyio.Semaphore = attrs.Factory(lambda: anyio.Semaphore(MAX_RUNNING_BUILDS))
    #: Bytes of blobs being stored now, already counted against the quota.
    _reserved: int = 0
    #: The true size of each digest, learned from a verified put or a full re-hash in
    #: this run: a stored file of another size is damaged. A stored digest missing
    #: here is hashed before it is first served.
    _sizes: dict[str, int] = attrs.Factory(dict)
    _verify_locks: dict[str, anyio.Lock] = attrs.Factory(dict)
    _rechecked: dict[str, float] = attrs.Factory(dict)
    #: Recent pulls, failures and counters for the status page and ``/metrics``.
    activity: Activity = attrs.Factory(Activity)
    #: Blobs being received now (by digest hex): clients read them as they arrive.
    receiving: dict[str, Receiving] = attrs.Factory(dict)

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
        # A ledger is created only in a data directory that has none yet: an existing one
        # that cannot be opened (a lost file, damage) stops the node with every file as
        # it was, never a silent new network in its place.
        new_ledger = not await anyio.to_thread.run_sync(lambda: (data / "ledger").exists())
        token = await anyio.to_thread.run_sync(cls._load_token, data)
        signer = await anyio.to_thread.run_sync(cls._load_identity, data)
        kv: KeyValueStore = core_plugins.create(
            "pyrsia.kv_store", config.kv_store,
            {"path": str(data / "ledger"), "create_if_missing": "true" if new_ledger else "false"},
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
                # An empty database is a first start that stopped early (a joining node
                # whose peers were away): nothing to lose. Keys without a chain are damage.
                if not new_ledger and [k async for k, _ in kv.scan(limit=1)]:
                    raise StoreError(
                        f"the ledger in {data / 'ledger'} holds no chain: it is damaged or "
                        "was emptied; refusing to start a new network in its place (move the "
                        "directory away to start afresh)"
                    )
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
            upstream = core_plugins.create("pyrsia.upstream", "registry",
                                           {**config.upstream_options, "url": config.upstream})
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
            try:
                token = path.read_text().strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(f"cannot read the admin token {path}: {exc}") from None
            if len(token) < MIN_ADMIN_TOKEN:
                # An empty token would let an empty bearer token in: refuse to run.
                raise UsageError(
                    f"the admin token in {path} is {'empty' if not token else 'too short'} "
                    f"({len(token)} characters, at least {MIN_ADMIN_TOKEN} needed); delete "
                    "the file to have a new one generated, or write a longer one"
                )
            return token
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
        """The records of a package this node vouches for (with a witness policy: only
        those a witnessed checkpoint covers)."""
        records = await self.log_store.records_for_package(package_type, package_id)
        if self.witnesses is not None:
            return self.witnesses.visible(records, package_id)  # type: ignore[no-any-return]
        return records

    async def records_for_artifact(self, digest: Digest) -> list[StoredRecord]:
        records = await self.log_store.records_for_artifact(digest.hex)
        if self.witnesses is not None:
            return self.witnesses.visible(records, str(digest))  # type: ignore[no-any-return]
        return records

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

    async def append_block(
        self, committed: CommittedBlock, *, own: bool = False, covered: bool = False
    ) -> None:
        """Validate and store a block committed elsewhere (from a peer or consensus).

        With a witness policy, a peer's block needs K witness cosignatures, unless
        ``covered`` (a later witnessed block of the same sync batch covers it) or ``own``
        (this build node's consensus decided it).
        """
        if self.witnesses is not None:
            self.witnesses.check_block(committed, covered=own or covered)
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
        if self.witnesses is not None:
            self.witnesses.adopted(committed)
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
        """Start (or join) the build of ``package_id``; ``run`` does the work.

        At most :data:`MAX_RUNNING_BUILDS` run at once and :data:`MAX_QUEUED_BUILDS` are
        running or waiting: past that, :class:`BuildQueueFull` (a client gets a 429).
        """
        key = (package_type, package_id)
        provenance.building()
        existing = self._inflight.get(key)
        if existing is not None:
            return existing
        if len(self._inflight) >= MAX_QUEUED_BUILDS:
            raise BuildQueueFull(
                f"this node is busy: {len(self._inflight)} builds are running or queued (at "
                f"most {MAX_QUEUED_BUILDS}); try again later"
            )
        self.prune_builds()
        build = Build(id=str(uuid.uuid4()), package_type=package_type, package_id=package_id)
        self.builds[build.id] = build
        self._inflight[key] = build

        async def runner() -> None:
            current_build.set(build)
            try:
                async with self.build_slots:
                    height = await run(build)
                build.status, build.height = "SUCCESS", height
            except Exception as exc:  # a build failure is reported, never crashes the node
                build.status = "FAILED"
                build.reason = str(exc) or type(exc).__name__
                build.error_type = type(exc)
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

    def prune_builds(
        self,
        *,
        keep: int = KEEP_FINISHED_BUILDS,
        keep_seconds: float = KEEP_FINISHED_SECONDS,
        cap: int = MAX_FINISHED_BUILDS,
        now: float | None = None,
    ) -> int:
        """Forget finished builds but the latest ``keep`` and those that finished within
        ``keep_seconds`` (at most ``cap`` in all); running builds stay. Returns how many
        were dropped."""
        now = time.time() if now is None else now
        finished = [b for b in self.builds.values() if b.finished is not None]
        drop = len(finished) - keep
        dropped = 0
        for i, build in enumerate(finished):  # oldest first (insertion order)
            if i >= drop:
                break
            assert build.finished is not None
            if now - build.finished > keep_seconds or len(finished) - dropped > cap:
                del self.builds[build.id]
                dropped += 1
        return dropped

    # -- blobs ---------------------------------------------------------------------

    async def store_stream(
        self, chunks: AsyncIterable[bytes], expected: Digest | None, size: int | None,
        *, on_receiving: Callable[[Receiving], None] | None = None,
    ) -> BlobInfo:
        """Verify and store a blob, evicting least-recently-used blobs as its bytes arrive.

        A declared ``size`` is only a promise: room is made for the bytes that actually
        arrive (in steps that at most double what has arrived), never ahead for what a
        manifest or a peer claims. A blob larger than the whole quota is refused at once.

        A blob of known digest (not a small one of known size) is received once into a
        file that clients may read as it grows (:class:`Receiving`, listed in
        :attr:`receiving` meanwhile and handed to ``on_receiving``); its end is released
        once it verified.
        """
        quota = self.blobs.quota
        if quota is not None and size is not None and size > quota:
            raise QuotaExceeded(
                f"a blob of {size} bytes is larger than the disk quota ({quota} bytes)"
            )
        stored = expected is not None and await self.blobs.stat(expected) is not None
        held = 0  # bytes of this blob counted in _reserved

        async def metered() -> AsyncIterator[bytes]:
            nonlocal held
            arrived = 0
            async for chunk in chunks:
                arrived += len(chunk)
                if arrived > held:
                    step = max(arrived - held, min(arrived, 4 << 20))
                    if size is not None:
                        step = max(arrived - held, min(step, size - held))
                    await self._reserve(step)
                    held += step
                yield chunk

        source = chunks if quota is None or stored else metered()
        try:
            if expected is not None and not stored and (size is None or size > SMALL_BLOB):
                info = await self._receive(source, expected, size, on_receiving)
            else:
                info = await self.blobs.put(source, expected=expected, expected_size=size)
        finally:
            self._reserved -= held
        self._sizes[info.digest.hex] = info.size
        provenance.stored(info.size)
        return info

    async def _receive(
        self, chunks: AsyncIterable[bytes], expected: Digest, size: int | None,
        on_receiving: Callable[[Receiving], None] | None,
    ) -> BlobInfo:
        path = partial_path(self.config.data_dir / "partial", expected)
        receiving = Receiving(expected, path, size)
        self.list_receiving(receiving)
        if on_receiving is not None:
            on_receiving(receiving)

        try:
            digest, written = await receive(chunks, receiving)
            try:
                return await self.store_verified_file(path, digest, written, receiving)
            finally:
                with anyio.CancelScope(shield=True):  # the store did not take it
                    await anyio.to_thread.run_sync(partial(path.unlink, missing_ok=True))
        finally:
            receiving.writer_done()
            self.unlist_receiving(receiving)

    def list_receiving(self, receiving: Receiving) -> bool:
        """List a blob in flight for clients (unless another fetch of it is listed)."""
        if receiving.digest.hex in self.receiving:
            return False
        self.receiving[receiving.digest.hex] = receiving
        return True

    def unlist_receiving(self, receiving: Receiving) -> None:
        if self.receiving.get(receiving.digest.hex) is receiving:
            del self.receiving[receiving.digest.hex]

    async def store_verified_file(self, path: Path, digest: Digest, size: int,
                                  receiving: Receiving | None = None) -> BlobInfo:
        """Hand a received file whose bytes the caller verified to the store (which may
        move it into place); clients still reading ``receiving`` switch to the store."""
        with anyio.CancelScope(shield=True):
            info = await self.blobs.adopt(str(path), digest, size, file_reader(str(path)))
        self._sizes[info.digest.hex] = info.size
        provenance.stored(info.size)
        if receiving is not None:
            receiving.stored = partial(self._read_stored, digest)
        return info

    def _read_stored(self, digest: Digest, offset: int, length: int | None
                     ) -> AsyncIterator[bytes]:
        return self.blobs.open(digest, offset=offset, length=length)

    async def put_bytes(self, data: bytes, expected: Digest) -> BlobInfo:
        """Store a small verified blob (a manifest), making room for it first."""
        return await self.store_stream(_one(data), expected, len(data))

    async def _reserve(self, needed: int) -> None:
        """Count ``needed`` more bytes against the quota, evicting LRU blobs to fit them."""
        await self.make_room(needed)
        self._reserved += needed

    async def make_room(self, needed: int) -> None:
        """Evict least-recently-used blobs until ``needed`` more bytes fit in the quota
        (besides the bytes of blobs being stored now).

        Every stored blob is in the log, so an evicted one can be fetched again.
        Raises :class:`QuotaExceeded` if the blob is larger than the whole quota.
        """
        quota = self.blobs.quota
        if quota is None:
            return
        if needed > quota:
            raise QuotaExceeded(f"a blob of {needed} bytes is larger than the disk quota ({quota})")
        free = quota - await self.blobs.usage() - self._reserved
        if free >= needed:
            return
        lru = getattr(self.blobs, "lru_digests", None)
        if lru is None:
            return
        async for digest in lru():
            info = await self.blobs.stat(digest)
            if info is not None and await self.blobs.delete(digest):
                free += info.size
                self.activity.evicted(info.size)
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

    # -- integrity of stored blobs ---------------------------------------------------

    async def local_blob(self, digest: Digest) -> BlobInfo | None:
        """The stored copy of ``digest``, if any; a copy whose size is not the digest's
        true size (known once verified in this run) is quarantined and reported absent."""
        info = await self.blobs.stat(digest)
        if info is None:
            return None
        known = self._sizes.get(digest.hex)
        if known is not None and known != info.size:
            await self.quarantine(digest, f"{info.size} bytes stored, {known} verified")
            return None
        return info

    async def verified_blob(self, digest: Digest) -> BlobInfo | None:
        """:meth:`local_blob`, hashed in full the first time it is asked for in this run
        (a copy from before the start, or damaged since): what a client is served."""
        info = await self.local_blob(digest)
        if info is None or digest.hex in self._sizes:
            return info
        if await self.verify_stored(digest):
            return await self.blobs.stat(digest)
        return None

    async def verify_stored(self, digest: Digest, *, force: bool = False) -> bool:
        """Hash the stored copy of ``digest``; quarantine it if the bytes do not match.

        Returns whether a good copy is stored. One hash per digest at a time; without
        ``force``, a digest already verified in this run is not hashed again.
        """
        lock = self._verify_locks.setdefault(digest.hex, anyio.Lock())
        try:
            async with lock:
                if not force and digest.hex in self._sizes:
                    return await self.local_blob(digest) is not None
                info = await self.blobs.stat(digest)
                if info is None:
                    return False
                try:
                    got, size = await self._hash_stored(digest, info)
                except (BlobNotFound, FileNotFoundError):
                    return False
                if got != digest.hex:
                    await self.quarantine(digest, f"its {size} bytes hash to sha256:{got}")
                    return False
                self._sizes[digest.hex] = size
                return True
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._verify_locks.pop(digest.hex, None)

    async def _hash_stored(self, digest: Digest, info: BlobInfo) -> tuple[str, int]:
        if info.path is not None:
            path = info.path

            def run() -> tuple[str, int]:
                h, n = hashlib.sha256(), 0
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                        n += len(chunk)
                return h.hexdigest(), n

            return await anyio.to_thread.run_sync(run)
        h, n = hashlib.sha256(), 0
        async for chunk in self.blobs.open(digest):
            h.update(chunk)
            n += len(chunk)
        return h.hexdigest(), n

    async def quarantine(self, digest: Digest, why: str) -> None:
        """Take a damaged copy out of the store (it is fetched again when next needed)."""
        self._sizes.pop(digest.hex, None)
        move = getattr(self.blobs, "quarantine", None)
        where = await move(digest) if move is not None else (
            "deleted" if await self.blobs.delete(digest) else None)
        if where is not None:
            self.activity.failure("stored_copy_damaged", "this node's store", why, str(digest))
            log.error("Stored blob %s is damaged (%s): quarantined (%s); it is fetched again "
                      "when next needed", digest, why, where)

    async def report_mismatch(self, digest: Digest) -> bool:
        """A client or peer says the copy of ``digest`` it got from here was wrong: hash it
        again now (at most once per :data:`RECHECK_INTERVAL` per digest). Returns whether
        a good copy is stored."""
        now = self.clock.monotonic()
        last = self._rechecked.get(digest.hex)
        if last is not None and now - last < RECHECK_INTERVAL:
            return await self.local_blob(digest) is not None
        if len(self._rechecked) > 10_000:
            self._rechecked = {k: t for k, t in self._rechecked.items()
                               if now - t < RECHECK_INTERVAL}
        self._rechecked[digest.hex] = now
        self.activity.failure("reported_mismatch", "this node's store (reported by a client "
                              "or peer)", "the copy served from here was reported wrong; "
                              "re-hashing it", str(digest))
        return await self.verify_stored(digest, force=True)

    async def scrub(self) -> None:
        """Hash every stored blob not yet verified in this run (a start-up check, run in the
        background); damaged ones are quarantined."""
        checked = bad = 0
        async for digest in self.blobs.iter_digests():
            if digest.hex in self._sizes:
                continue
            await self.priority.wait()
            if not await self.verify_stored(digest) and await self.blobs.stat(digest) is None:
                bad += 1
            checked += 1
        log.info("Start-up check of stored blobs: %d hashed, %d damaged and quarantined",
                 checked, bad)

    # -- the cache -------------------------------------------------------------------

    async def cache_entries(self) -> list[tuple[Digest, int, float | None]]:
        """``(digest, size, last used)`` of stored blobs, least recently used first."""
        entries = getattr(self.blobs, "lru_entries", None)
        if entries is not None:
            return list(await entries())
        out: list[tuple[Digest, int, float | None]] = []
        async for digest in self.blobs.iter_digests():
            info = await self.blobs.stat(digest)
            if info is not None:
                out.append((digest, info.size, None))
        return out

    async def prune_cache(
        self, *, bytes_: int | None = None, everything: bool = False,
        older_than: float | None = None,
    ) -> list[tuple[Digest, int]]:
        """Evict least-recently-used blobs: until ``bytes_`` are freed, all of them, or
        those unused for ``older_than`` seconds. Returns what was removed."""
        if not everything and bytes_ is None and older_than is None:
            raise UsageError("say what to prune: a number of bytes, older_than, or all")
        removed: list[tuple[Digest, int]] = []
        freed = 0
        now = time.time()
        for digest, size, used in await self.cache_entries():
            if bytes_ is not None and freed >= bytes_:
                break
            if older_than is not None and used is not None and now - used < older_than:
                break  # LRU order: every later one was used more recently
            if await self.blobs.delete(digest):
                removed.append((digest, size))
                freed += size
                log.info("Pruned %s (%d bytes) from the cache", digest, size)
        return removed

    # -- part lists (swarm fetch of large blobs) ------------------------------------

    async def part_list(self, digest: Digest, *, background: bool = False) -> PartList:
        """The part list of a stored blob, read from the store (its document is stored
        too, so this node serves it). Parts are of the protocol's fixed size, so every
        node computes the same list. With ``background``, a stored file is hashed at low
        CPU priority (clients reading what was just fetched go first)."""
        info = await self.blobs.stat(digest)
        if background and info is not None and info.path is not None:
            path = info.path

            def run() -> PartList:
                hasher = PartHasher()
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        hasher.update(chunk)
                return hasher.finish(digest)

            parts = await in_background(run)
        else:
            hasher = PartHasher()
            async for chunk in self.blobs.open(digest):
                await anyio.to_thread.run_sync(hasher.update, chunk)  # off the event loop
            parts = hasher.finish(digest)
        if await self.blobs.stat(parts.digest) is None:
            await self.put_bytes(parts.to_bytes(), parts.digest)
        return parts

    async def part_list_records(self, digests: list[Digest], timestamp: int) -> list[Record]:
        """Records logging the part lists of the large blobs among ``digests``."""
        out: list[Record] = []
        for digest in dict.fromkeys(digests):
            info = await self.blobs.stat(digest)
            if info is None or info.size < self.part_threshold:
                continue
            parts = await self.part_list(digest, background=True)
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
            **(self.witnesses.status() if self.witnesses is not None else {}),
        }

    def build_json(self, build: Build) -> dict[str, Any]:
        """A build's status as the node API shows it (with why a quorum is missing)."""
        out = build.to_json()
        if build.status == "WAITING_FOR_QUORUM" and self.consensus is not None:
            stall = self.consensus.stall()
            if stall is not None:
                out["reason"] = stall["reason"]
        return out
