"""Running a node: open it, serve its apps, stop cleanly."""

from __future__ import annotations

import errno
import logging
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import attrs
from pyrsia_core.errors import UsageError

from pyrsia_core import PARTS_RECORD_TYPE

from ._api import NodeApi
from ._app import NodeApp
from ._config import NodeConfig
from ._consensus_node import ConsensusRunner
from ._node import Node
from ._p2p import PeerConfig, PeerService
from ._packages import PackageService
from ._transports import create_transports, transport_names
from ._witness import WitnessApp, WitnessService

__all__ = ["RunningNode", "run_node", "start_node"]

log = logging.getLogger("pyrsia.node")


@attrs.define(eq=False)
class RunningNode:
    """A node started by :func:`start_node`: the node, its ASGI app and its HTTP port."""

    node: Node
    app: NodeApp
    #: The package-type plugins (Docker, Maven, ...): their builds and rebuild checks.
    packages: PackageService
    port: int | None = None

    @property
    def url(self) -> str:
        return f"http://{self.node.config.host}:{self.port}"


@asynccontextmanager
async def start_node(config: NodeConfig, *, serve_http: bool = True) -> AsyncIterator[RunningNode]:
    """Open a node and (optionally) serve it; leaving the block stops it.

    Usable from any anyio program: ``async with start_node(cfg) as running: ...``.
    """
    transport = create_transports(config.transport, _transport_options(config))
    if serve_http:
        try:
            _check_address(config.host, config.port)
        except BaseException:
            await transport.aclose()
            raise
    peer_config = PeerConfig(
        peers=tuple(config.peers),
        listen_only=config.listen_only,
        no_serve=config.no_serve,
        max_upload_rate=config.max_upload_rate,
        public_url=config.public_url or f"http://{config.host}:{config.port}",
        sync_interval=config.sync_interval,
    )
    genesis_source = None
    if config.peers:

        async def genesis_source_fn() -> Any:
            asker = PeerService(_GenesisOnly(config), transport, peer_config)  # type: ignore[arg-type]
            try:
                return await _retrying(lambda: asker.fetch_genesis(config.peers),
                                       config.join_timeout)
            finally:
                await asker.aclose()

        genesis_source = genesis_source_fn
    try:
        node = await Node.open(config, genesis_source=genesis_source)
    except BaseException:
        await transport.aclose()
        raise
    try:
        node.witnesses = witnesses = await WitnessService.open(node)
        async with anyio.create_task_group() as tg:
            peers = PeerService(node, transport, peer_config)
            node.peers = peers

            fork_peers = _test_fork_peers()

            async def published(committed: Any) -> None:
                # The witnesses cosign first, so the block travels with its cosignatures.
                cosigned = await witnesses.after_commit(committed)
                if fork_peers and committed.block.height > 0:  # a fault injected by tests
                    await _test_equivocate(node, peers, witnesses, committed, fork_peers)
                await peers.gossip(cosigned, exclude=fork_peers)

            node.commit_listeners.append(lambda committed: _spawn(tg, published, committed))
            packages = PackageService(node, tg, timeout=config.plugin_timeout)

            async def rebuild_check(block: Any) -> bool:
                # Each record is rebuilt by its own package type (a plugin);
                # then the part lists of large blobs are recomputed from this node's copy.
                plain = tuple(
                    r for r in block.records if r.record.package_type != PARTS_RECORD_TYPE
                )
                if plain and not await packages.rebuild_check(
                        attrs.evolve(block, records=plain)):
                    return False
                return await node.check_part_lists(block)

            consensus = ConsensusRunner(
                node, rebuild_check,
                lambda t, b, ids, attachment=None: _send_all(tg, peers, t, b, ids, attachment),
                stall_after=min(10.0, config.consensus_timeout / 3),
            )
            node.consensus = consensus
            node.build_request_handler = packages.build_request_handler()
            p2p_app = transport.asgi_app(peers.handle, peers.blob_source)
            app = NodeApp(NodeApi(packages), p2p_app, packages.mounts(),
                          witness=WitnessApp(witnesses))
            running = RunningNode(node, app, packages)
            if serve_http:
                from ._server import serve

                port = await tg.start(serve, app, config.host, config.port)
                running.port = port
                url = f"http://{config.host}:{port}"
                node.listen_urls.append(url)
                if not config.public_url:
                    peers.config.public_url = url
                log.info("Pyrsia node listening on %s (upstream: %s)", url, ", ".join(
                    _upstreams(node)) or "none")
                _write_url(config, url)
            await _start_listeners(tg, config, transport, peers, p2p_app is not None and serve_http)
            await tg.start(peers.run)
            await tg.start(consensus.run)
            tg.start_soon(_scrub, node)
            try:
                yield running
            finally:
                tg.cancel_scope.cancel()
                if running.port is not None:
                    (config.data_dir / URL_FILE).unlink(missing_ok=True)
    finally:
        with anyio.CancelScope(shield=True):
            if node.witnesses is not None:
                await node.witnesses.aclose()
            if node.peers is not None:
                await node.peers.aclose()
            await transport.aclose()
        await node.aclose()


#: The node's API address, in its data dir while it runs (the CLI finds it by PYRSIA_HOME).
URL_FILE = "node.url"


def _check_address(host: str, port: int) -> None:
    """Fail before anything is created if ``host:port`` cannot be listened on."""
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            hint = (" (is another node running there? choose another port with -p)"
                    if exc.errno == errno.EADDRINUSE else "")
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                             f"{hint}") from None


def _upstreams(node: Node) -> list[str]:
    """Where the node builds from: each package type's own upstream, or the node's."""
    out = []
    for name, pt in sorted(node.package_types.items()):
        url = getattr(pt, "upstream_url", None) or getattr(pt, "upstream", None)
        if isinstance(url, str) and url:
            out.append(f"{name} {url}")
        elif getattr(pt, "can_build", False) and node.config.upstream:
            out.append(f"{name} {node.config.upstream}")
        registries = getattr(pt, "registries", None)  # the Docker plugin's other registries
        if isinstance(registries, dict):
            out += [f"{name} {host}={getattr(source, 'url', '?')}"
                    for host, source in sorted(registries.items())]
    return out


def _write_url(config: NodeConfig, url: str) -> None:
    host = urllib.parse.urlsplit(url).hostname or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        url = url.replace(host, "127.0.0.1" if host == "0.0.0.0" else "[::1]", 1)
    try:
        (config.data_dir / URL_FILE).write_text(url + "\n")
    except OSError as exc:
        log.warning("Could not write %s: %s", config.data_dir / URL_FILE, exc)


async def _scrub(node: Node) -> None:
    """The start-up check of stored blobs, in the background; a failure is logged."""
    try:
        await node.scrub()
    except Exception as exc:  # the store closing under it, a broken plugin: not fatal
        log.warning("The start-up check of stored blobs stopped: %s", exc)


def _transport_options(config: NodeConfig) -> dict[str, dict[str, str]]:
    quic_port = config.port if config.quic_port is None else config.quic_port
    options = {name: dict(values) for name, values in config.transport_options.items()}
    if "quic" in transport_names(config.transport):
        options.setdefault("quic", {}).update({"host": config.host, "port": str(quic_port)})
    return options


async def _start_listeners(
    tg: anyio.abc.TaskGroup,
    config: NodeConfig,
    transport: Any,
    peers: PeerService,
    http_peers: bool,
) -> None:
    """Start the transports with their own listener (QUIC); advertise every address."""
    urls = [peers.config.public_url] if http_peers else []
    for name, listener in transport.listeners():
        port = await tg.start(listener.serve, peers.handle, peers.blob_source)
        url = f"{name}://{config.host}:{port}"
        urls.append(url)
        log.info("Pyrsia node listening for peers on %s", url)
    if not config.public_url and urls:
        peers.config.public_url = ",".join(urls)


async def _retrying(attempt: Any, limit: float) -> Any:
    """``await attempt()`` until it succeeds or ``limit`` seconds passed (peers started at
    the same moment as this node may not listen yet); then its last error."""
    from pyrsia_core.errors import TransportError

    deadline = anyio.current_time() + limit
    delay = 0.2
    while True:
        try:
            return await attempt()
        except TransportError as exc:
            if anyio.current_time() + delay >= deadline:
                raise
            log.info("Waiting for a peer to answer (%s)", exc)
            await anyio.sleep(delay)
            delay = min(delay * 2, 2.0)


#: TEST-ONLY fault injection: a build node started with this variable (comma-separated
#: node ids) equivocates -- it signs a second, conflicting block at each height, asks its
#: witnesses to cosign that one too, and gossips it (not the real one) to those peers.
TEST_FORK_PEERS_ENV = "PYRSIA_TEST_FORK_PEERS"


def _test_fork_peers() -> set[str]:
    import os

    value = os.environ.get(TEST_FORK_PEERS_ENV, "")
    peers = {p.strip() for p in value.split(",") if p.strip()}
    if peers:
        log.warning("TEST FAULT INJECTION: this build node equivocates to %d peer(s) (%s is "
                    "set; never use it outside tests)", len(peers), TEST_FORK_PEERS_ENV)
    return peers


async def _test_equivocate(node: Node, peers: PeerService, witnesses: WitnessService,
                           committed: Any, targets: set[str]) -> None:
    """TEST-ONLY: sign another block at ``committed``'s height (its records under the tag
    ``<tag>-fork``), try to have it cosigned, and send it to ``targets``."""
    from pyrsia_core import Block, CommittedBlock, MerkleTree, Record, SignedRecord, leaf_hash

    block = committed.block
    records = []
    for sr in block.records:
        r = sr.record
        pid = r.package_specific_id + "-fork"
        records.append(SignedRecord.sign(Record.new(
            signer=node.signer, package_type=r.package_type, package_specific_id=pid,
            package_specific_artifact_id=(pid if r.package_specific_artifact_id
                                          == r.package_specific_id
                                          else r.package_specific_artifact_id),
            artifact_hash=r.artifact_hash, num_artifacts=r.num_artifacts,
            timestamp=r.timestamp + 1, operation=r.operation, source_hash=r.source_hash,
            source_id=r.source_id), node.signer))
    ledger = node.log_store.ledger
    old = block.tree_size - len(block.records)
    tree = MerkleTree.from_leaves(ledger.tree.leaf(i) for i in range(old))
    tree.extend(leaf_hash(sr.record.canonical()) for sr in records)
    fork_block = Block(height=block.height, parent=block.parent, timestamp=block.timestamp,
                       proposer=block.proposer, records=tuple(records), tree_size=tree.size,
                       root=tree.root().hex())
    fork = CommittedBlock(fork_block, ledger.sign_block(fork_block, node.signer))
    cosigned = 0
    for target in witnesses.targets:
        try:
            if await witnesses._cosign(target, fork) is not None:
                cosigned += 1
        except Exception as exc:  # refused, as it must be
            log.warning("TEST FAULT: witness %s refused the fork of block %d: %s",
                        target.cosigner.name, block.height, exc)
    log.warning("TEST FAULT: fork of block %d cosigned by %d of %d witnesses; sending it to "
                "%d peer(s)", block.height, cosigned, len(witnesses.targets), len(targets))
    for nid in targets:
        address = peers.address_of(nid)
        if address is not None:
            try:
                await peers.rpc(address, "NEW_BLOCK", {"block": fork.to_json()}, {"OK"})
            except Exception as exc:
                log.warning("TEST FAULT: fork to %s failed: %s", nid[:16], exc)


async def _spawn(tg: anyio.abc.TaskGroup, fn: Any, *args: Any) -> None:
    tg.start_soon(fn, *args)


async def _send_all(
    tg: anyio.abc.TaskGroup, peers: PeerService, type_: str, body: dict[str, Any],
    node_ids: list[str], attachment: bytes | None = None,
) -> None:
    """Send a consensus message to validators without waiting (a slow one stalls nobody)."""

    async def one(nid: str) -> None:
        address = peers.address_of(nid)
        if address is None:
            log.debug("no address known for validator %s", nid[:16])
            return
        try:
            await peers.rpc(address, type_, body, {"OK"}, attachment)
        except Exception as exc:  # a validator that is down or refuses: consensus copes
            log.debug("%s to %s failed: %s", type_, nid[:16], exc)

    for nid in node_ids:
        tg.start_soon(one, nid)


@attrs.define
class _GenesisOnly:
    """Just enough of a node for a PeerService to ask peers for the genesis block."""

    config: NodeConfig
    signer: Any = attrs.field(init=False)
    node_id: str = attrs.field(init=False)
    clock: Any = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        from pyrsia_core.interfaces import SystemClock

        # The node's own key (Node.open loads the same file): a throwaway id would be
        # a phantom peer to whoever answers. The asked peer does not record a node that
        # only asked for the genesis; the reply is verified by its content anyway.
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        self.signer = Node._load_identity(self.config.data_dir)
        self.node_id = self.signer.node_id
        self.clock = SystemClock()


async def run_node(config: NodeConfig) -> None:
    """Serve until cancelled, SIGINT (Ctrl-C) or SIGTERM; then close the stores cleanly.

    The signals are caught from the start: a node still starting (waiting for its peers)
    stops as cleanly as a running one."""
    import signal

    started: list[RunningNode] = []
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:

            async def serve() -> None:
                async with start_node(config) as running:
                    started.append(running)
                    await anyio.sleep_forever()

            tg.start_soon(serve)
            async for signum in signals:
                log.info(
                    "Received %s, stopping node %s",
                    signal.Signals(signum).name,
                    started[0].node.node_id if started else "(still starting)",
                )
                tg.cancel_scope.cancel()
                break
