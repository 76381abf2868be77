"""The node API under ``/api/`` (JSON), used by the ``pyrsia`` CLI."""

from __future__ import annotations

import csv
import hmac
import io
import logging
import re
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import parse_qsl

import attrs
from pyrsia_core.errors import BuildsBusy, EncodingError, PyrsiaError

from pyrsia_core import RECORD_FIELDS, StoredRecord, canonical_loads

from ._apiguard import api_request_problem, json_problem
from ._asgi import Receive, Scope, Send, header_values, read_body, route_path, send_bytes, send_json
from ._cacheapi import cache_route

__all__ = ["NodeApi", "format_records"]

log = logging.getLogger("pyrsia.api")
FIELD_NAMES: Final = [name for name, _ in RECORD_FIELDS]
_NODE_ID: Final = re.compile(r"[0-9a-f]{64}")


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _query(scope: Scope) -> dict[str, str]:
    return dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))


def _flag(query: dict[str, str], name: str) -> bool:
    return query.get(name, "false").lower() in ("1", "true", "yes", "")  if name in query else False


def format_records(
    records: list[dict[str, Any]], *, fields: list[str] | None, fmt: str
) -> tuple[str, str]:
    """Render records as JSON (the seed's array) or CSV; returns (content type, text)."""
    if fields:
        records = [{k: r[k] for k in fields if k in r} for r in records]
    if fmt == "csv":
        out = io.StringIO()
        names = fields or FIELD_NAMES
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(names)
        for r in records:
            writer.writerow([r.get(k, "") for k in names])
        return "text/csv", out.getvalue()
    import json

    return "application/json", json.dumps(records, indent=2) + "\n"


@attrs.define(eq=False)
class NodeApi:
    """``/api/ping``, ``/api/status``, ``/api/peers``, ``/api/package-types``, builds and
    inspect-log, for every installed package type (``/api/build/<type>``)."""

    #: The node's PackageService: its package-type plugins.
    packages: Any

    @property
    def node(self) -> Any:
        return self.packages.node

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        config = self.node.config
        problem = api_request_problem(scope, listen_host=config.host,
                                      allowed=config.allowed_hosts)
        if problem is not None:
            await send_json(send, problem[0], {"error": problem[1]})
            return
        try:
            await self._dispatch(scope, receive, send)
        except ApiError as exc:
            await send_json(send, exc.status, {"error": str(exc)})
        except BuildsBusy as exc:
            await send_json(send, 429, {"error": str(exc)}, [("retry-after", "5")])
        except PyrsiaError as exc:
            log.error("node API %s failed: %s", scope.get("path"), exc)
            await send_json(send, 500, {"error": str(exc)})

    def _authorized(self, scope: Scope) -> bool:
        if not self.node.admin_token:
            return False  # no token, no admin: an empty one must never match
        for value in header_values(scope, "authorization"):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip() and hmac.compare_digest(
                token.strip().encode(), self.node.admin_token.encode()
            ):
                return True
        return False

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope).rstrip("/")
        method = scope["method"]
        parts = path.split("/")[1:]  # ["api", ...]
        if parts[:1] != ["api"]:
            raise ApiError(404, f"no route for {path[:200]}")
        route = parts[1:]
        if route == ["ping"] and method in ("GET", "HEAD"):
            await send_json(send, 200, {"status": "ok", "node_id": self.node.node_id})
        elif route == ["status"] and method == "GET":
            await send_json(send, 200, await self.node.status())
        elif route == ["peers"] and method == "GET":
            peers = self.node.peers
            await send_json(send, 200, peers.peers() if peers is not None else [])
        elif route == ["package-types"] and method == "GET":
            await send_json(send, 200, self._package_types())
        elif len(route) == 2 and route[0] == "build" and method == "POST":
            self._require_json(scope)
            await self._build(scope, receive, send, route[1])
        elif len(route) == 2 and route[0] == "builds" and method == "GET":
            build = self.node.builds.get(route[1])
            if build is not None:
                await send_json(send, 200, self.node.build_json(build))
                return
            try:
                remote = await self.packages.forwarded_status(route[1])
            except PyrsiaError as exc:
                raise ApiError(503, f"build {route[1][:64]!r} runs on a build node that did not "
                               f"answer: {exc}") from None
            if remote is None:
                remote = await self._ask_build_nodes(route[1])
            if remote is None:
                raise ApiError(404, f"no build with id {route[1][:64]!r}")
            await send_json(send, 200, remote)
        elif route == ["authorize"] and method == "POST":
            self._require_json(scope)
            await self._node_change(scope, receive, send, add=True)
        elif route == ["deauthorize"] and method == "POST":
            self._require_json(scope)
            await self._node_change(scope, receive, send, add=False)
        elif route == ["config"] and method == "GET":
            await send_json(send, 200, self._config_json())
        elif route == ["config"] and method in ("PUT", "POST"):
            self._require_json(scope)
            await self._set_config(scope, receive, send)
        elif len(route) == 2 and route[0] == "inspect-log" and method == "GET":
            await self._inspect(scope, send, route[1])
        elif route[:1] == ["cache"]:
            await cache_route(self, scope, receive, send, route[1:])
        elif route and route[0] in ("ping", "status", "peers", "build", "builds", "inspect-log",
                                    "authorize", "deauthorize", "config", "package-types"):
            raise ApiError(405, f"{method} is not allowed on {path}")
        else:
            raise ApiError(404, f"no route for {path[:200]}")

    async def _ask_build_nodes(self, build_id: str) -> dict[str, Any] | None:
        """The status of a build this node did not start or forward: asked of every build
        node (a build id handed out by any node of the network is answered by any node)."""
        import anyio

        peers = self.node.peers
        if peers is None or not re.fullmatch(r"[0-9a-f-]{36}", build_id):
            return None
        found: list[dict[str, Any]] = []

        async def ask(nid: str) -> None:
            address = peers.address_of(nid)
            if address is None:
                return
            with anyio.move_on_after(5.0):
                try:
                    env = await peers.rpc(address, "GET_BUILD", {"build_id": build_id},
                                          {"BUILD_STATUS"})
                except (PyrsiaError, ValueError):
                    return
                found.append({**env.body, "build_node": nid})

        async with anyio.create_task_group() as tg:
            for nid in self.node.log_store.ledger.validators.ordered():
                if nid != self.node.node_id:
                    tg.start_soon(ask, nid)
        return found[0] if found else None

    @staticmethod
    def _require_json(scope: Scope) -> None:
        problem = json_problem(scope)
        if problem is not None:
            raise ApiError(415, problem)

    def _package_types(self) -> list[dict[str, Any]]:
        """The installed package types: name, log record type, id parameter, mount."""
        out = []
        for name, host in sorted(self.packages.hosts.items()):
            pt = host.package_type
            out.append({"name": name, "record_type": pt.record_type, "id_param": pt.id_param,
                        "mount_path": pt.mount_path, "builds": bool(pt.can_build)})
        return out

    def _plugin(self, package_type: str) -> Any:
        """The package-type plugin serving ``package_type``."""
        pt = self.packages.get(package_type)
        if pt is None:
            known = sorted(self.packages.hosts)
            raise ApiError(400, f"unknown package type {package_type!r:.100} (known: "
                           f"{', '.join(known) or 'none installed'})")
        return pt

    def _package_id(self, pt: Any, text: Any) -> str:
        from ._packages import _parse

        if not text or not isinstance(text, str):
            raise ApiError(400, f"a {pt.id_param} is required for {pt.name} packages")
        try:
            return _parse(pt, text)
        except ValueError as exc:
            raise ApiError(400, f"invalid {pt.id_param} {text!r:.200}: {exc}") from None

    async def _build(self, scope: Scope, receive: Receive, send: Send, package_type: str) -> None:
        try:
            body: Any = canonical_loads(await read_body(receive, 64 * 1024) or b"{}")
        except (EncodingError, ValueError) as exc:
            raise ApiError(400, f"request body must be a JSON object: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        pt = self._plugin(package_type)
        text = body.get(pt.id_param, body.get("package_id"))
        await self._plugin_build(send, pt, self._package_id(pt, text))

    async def _plugin_build(self, send: Send, pt: Any, package_id: str) -> None:
        if await self.node.records_for_package(pt.record_type, package_id):
            raise ApiError(409, f"Artifact already exists: {package_id} is in the "
                           "transparency log")
        if not self.node.is_build_node:
            try:
                await send_json(send, 202, await self.packages.forward_build(pt, package_id))
            except PyrsiaError as exc:
                raise ApiError(503, f"this node is not a build node, and {exc}") from None
            return
        build = self.packages.start_build(pt, package_id)
        await send_json(send, 202, build.to_json())

    async def _settle(self, record_type: str, package_id: str, limit: float = 5.0) -> None:
        """Wait (bounded) for a running build of the package to commit."""
        import anyio

        running = self.node.inflight.get((record_type, package_id))
        if running is not None:
            with anyio.move_on_after(limit):
                await running.done.wait()

    async def _admin_body(self, scope: Scope, receive: Receive, what: str) -> dict[str, Any]:
        """The JSON object of an admin request (the node's admin token is required)."""
        if not self._authorized(scope):
            raise ApiError(401, f"{what} needs the node's admin token (Authorization: Bearer "
                           "<token>; the token is in the node's data directory, admin.token)")
        try:
            body: Any = canonical_loads(await read_body(receive, 64 * 1024) or b"{}")
        except (EncodingError, ValueError) as exc:
            raise ApiError(400, f"request body must be a JSON object: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    async def _node_change(self, scope: Scope, receive: Receive, send: Send, *, add: bool) -> None:
        """Commit an AddNode (authorize) or RemoveNode (deauthorize) record.

        A node is authorized only if it proves now that it holds its key (it answers
        this node's PING at its address, signed by that key), and only if the build
        nodes that are up can still reach a quorum without it -- or with ``force``.
        """
        what = "authorize" if add else "deauthorize"
        body = await self._admin_body(scope, receive, what)
        peer, force = body.get("peer"), body.get("force", False)
        if not isinstance(peer, str) or not _NODE_ID.fullmatch(peer):
            raise ApiError(400, "give the peer's node id (64 lowercase hex characters)")
        if type(force) is not bool:
            raise ApiError(400, "force must be true or false")
        node = self.node
        if not node.is_build_node:
            raise ApiError(403, f"only an authorized build node can {what} a build node")
        validators = node.log_store.ledger.validators
        from pyrsia_core import PublicKey, Record, quorum_threshold

        if add:
            if peer in validators:
                raise ApiError(409, f"node {peer} is already an authorized build node")
            key = await self._proven_key(peer)
            after = len(validators) + 1
        else:
            if peer not in validators:
                raise ApiError(404, f"node {peer} is not an authorized build node")
            if len(validators) == 1:
                raise ApiError(409, "the last build node cannot be deauthorized")
            key = validators.members[peer].hex
            after = len(validators) - 1
        up = await self._build_nodes_up(exclude=peer)
        needed = quorum_threshold(after)
        if len(up) < needed and not force:
            change = (f"authorizing {peer[:16]}… makes {after} build nodes" if add else
                      f"deauthorizing {peer[:16]}… leaves {after} build node(s)")
            raise ApiError(409, (
                f"{change}, of which {needed} must sign every block, but only {len(up)} "
                f"build node(s) besides it answer now ({', '.join(n[:16] for n in up) or 'none'}):"
                " "
                + ("every build would then wait for the new node. " if add else
                   "no build could commit. ")
                + f"Repeat with --force to {what} anyway."))
        record = Record.node_change(signer=node.signer, subject=PublicKey.from_hex(key),
                                    timestamp=int(node.clock.now()), add=add)
        try:
            committed = await node.commit([record])
        except PyrsiaError as exc:
            raise ApiError(503, f"{what} not committed: {exc}") from None
        out = {"ledger_height": committed.block.height,
               "authorized_build_nodes": node.log_store.ledger.validators.ordered()}
        out["authorized" if add else "deauthorized"] = peer
        await send_json(send, 200, out)

    async def _proven_key(self, peer: str) -> str:
        """``peer``'s public key, once it answered a PING at its address signed by that key."""
        peers = self.node.peers
        address = peers.address_of(peer) if peers is not None else None
        if peers is None or address is None:
            raise ApiError(404, f"node {peer} is not a known peer: it must have joined this "
                           "node's network (start it with --peer pointing here)")
        try:
            env = await peers.ping(address)
        except (PyrsiaError, ValueError) as exc:
            raise ApiError(409, f"node {peer} did not answer at {address}: {exc}") from None
        if env.sender != peer:
            raise ApiError(409, f"the node at {address} is {env.sender}, not {peer}: {peer} "
                           "never proved it holds its key")
        return str(env.public_key.hex)

    async def _build_nodes_up(self, *, exclude: str) -> list[str]:
        """This node and the other build nodes that answer a PING now (2 s each, at once)."""
        import anyio

        node = self.node
        up = [node.node_id] if node.node_id != exclude else []
        peers = node.peers
        others = [v for v in node.log_store.ledger.validators.ordered()
                  if v not in (node.node_id, exclude)]

        async def ask(nid: str) -> None:
            address = peers.address_of(nid) if peers is not None else None
            if address is None:
                return
            with anyio.move_on_after(2.0):
                try:
                    env = await peers.ping(address)
                except (PyrsiaError, ValueError):
                    return
                if env.sender == nid:
                    up.append(nid)

        async with anyio.create_task_group() as tg:
            for nid in others:
                tg.start_soon(ask, nid)
        return up

    def _config_json(self) -> dict[str, Any]:
        from ._config import format_size

        size = self.node.disk_space
        return {"disk_space": size, "disk_space_text": format_size(size),
                "data_dir": str(self.node.config.data_dir)}

    async def _set_config(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Change the node's settings (admin): ``{"disk_space": "5 GB"}`` (or bytes)."""
        from pyrsia_core.errors import UsageError

        from ._config import parse_size

        body = await self._admin_body(scope, receive, "changing the node's configuration")
        unknown = sorted(set(body) - {"disk_space"})
        if unknown or not body:
            raise ApiError(400, "the node's configuration has one setting: disk_space"
                           + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        raw = body["disk_space"]
        try:
            size = parse_size(raw) if isinstance(raw, str) else parse_size(f"{int(raw)} B")
        except (UsageError, ValueError, TypeError) as exc:
            raise ApiError(400, f"invalid disk_space {raw!r:.100}: {exc}") from None
        evicted = await self.node.set_disk_space(size)
        await send_json(send, 200, {**self._config_json(), "evicted_bytes": evicted})

    async def _inspect(self, scope: Scope, send: Send, package_type: str) -> None:
        query = _query(scope)
        pt = self._plugin(package_type)
        record_type = pt.record_type
        package_id = self._package_id(pt, query.get(pt.id_param, query.get("package_id")))
        fmt = query.get("format", "json")
        if fmt not in ("json", "csv"):
            raise ApiError(400, "format must be json or csv")
        fields = [f.strip() for f in query["fields"].split(",") if f.strip()] if query.get(
            "fields") else None
        if fields:
            unknown = [f for f in fields if f not in FIELD_NAMES]
            if unknown:
                raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; fields are "
                               f"{', '.join(FIELD_NAMES)}")
        await self._settle(record_type, package_id)
        stored: list[StoredRecord] = await self.node.records_for_package(record_type, package_id)
        if not stored:
            raise ApiError(404, f"no transparency log records for {package_id}")
        if _flag(query, "latest"):
            top = max(r.height for r in stored)
            stored = [r for r in stored if r.height == top]
        out: list[dict[str, Any]] = []
        proof = _flag(query, "proof")
        types: Mapping[str, str] = {}
        if _flag(query, "artifact_types"):
            if fmt == "csv" or fields or proof:
                raise ApiError(400, "--artifact-types is available with the plain JSON "
                               "format only")
            try:
                types = await pt.artifact_types(package_id)
            except PyrsiaError as exc:
                raise ApiError(503, f"artifact types of {package_id}: {exc}") from None
        ledger = self.node.log_store.ledger
        certificate = None
        if proof:
            certificate = await self.node.log_store.certificate(ledger.height)
        for r in stored:
            item = r.signed.record.to_json()
            if proof and certificate is not None:
                item = dict(item)
                if fields:
                    item = {k: item[k] for k in fields}
                item["proof"] = {
                    "leaf_index": r.index,
                    "tree_size": ledger.tree.size,
                    "block_height": r.height,
                    "inclusion_proof": [h.hex() for h in self.node.log_store.inclusion_proof(
                        r.index, ledger.tree.size)],
                    "record_signature": r.signed.signature.hex(),
                    "checkpoint": certificate.to_text(),
                }
            artifact_type = types.get(item["package_specific_artifact_id"])
            if artifact_type is not None:
                item = {**item, "artifact_type": artifact_type}
            out.append(item)
        if proof:
            if fmt == "csv":
                raise ApiError(400, "--proof is available with the JSON format only")
            import json

            await send_bytes(send, 200, (json.dumps(out, indent=2) + "\n").encode(),
                             content_type="application/json")
            return
        content_type, text = format_records(out, fields=fields, fmt=fmt)
        await send_bytes(send, 200, text.encode(), content_type=content_type)
