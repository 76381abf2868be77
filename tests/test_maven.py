"""The Maven package type on real nodes: /maven2 over HTTP, builds, log, tampering, peers.

Each node is started in-process with ``start_node`` on a free 127.0.0.1 port; its
Maven upstream is a read-only Maven-layout directory served on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from pyrsia_core.interfaces import PackageType
from pyrsia_core.testing.conformance import PackageTypeConformance
from pyrsia_pkg_maven import MavenPackageType
from support.maven import MavenRepoServer, maven_upstream, write_gav
from support.net import free_port
from support.node import run_cli

from pyrsia_core import RECORD_FIELDS, Block, Digest, plugins

pytestmark = pytest.mark.process
HELLO = "com.example:hello:1.0"
HELLO_DIR = "com/example/hello/1.0"


def _repo(root: Path) -> dict[str, bytes]:
    files = write_gav(root, "com.example", "hello", "1.0", sha1=True)
    files |= write_gav(root, "com.example", "hello", "1.1")
    files |= write_gav(root, "com.example", "parent", "2", packaging="pom")
    files |= write_gav(root, "com.example", "nojar", "1.0", jar=False)
    return files


@asynccontextmanager
async def _node(tmp: Path, name: str, maven: str | None, *, peers: tuple[str, ...] = (),
                plugin_timeout: float = 60.0) -> AsyncIterator[Any]:
    from pyrsia_registry import NodeConfig, start_node

    options = {"maven": {"upstream": maven, "timeout": "10"}} if maven else {}
    config = NodeConfig(host="127.0.0.1", port=free_port(), data_dir=tmp / name, upstream=None,
                        peers=peers, sync_interval=0.3, package_options=options,
                        plugin_timeout=plugin_timeout)
    async with start_node(config) as running:
        yield running


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "upstream"
    return root, _repo(root)


async def _until(condition: Callable[[], Awaitable[bool]], limit: float = 20.0) -> None:
    """Poll ``condition`` until it holds (fails the test after ``limit`` seconds)."""
    with anyio.fail_after(limit):
        while not await condition():  # noqa: ASYNC110 - polls state no event signals
            await anyio.sleep(0.05)


def _block(stored: list[Any]) -> Block:
    """A probe block holding these records (what a validator is asked to rebuild)."""
    return Block(height=0, parent="0" * 64, timestamp=0, proposer="0" * 64,
                 records=tuple(s.signed for s in stored), tree_size=0, root="0" * 64)


@pytest.mark.anyio
async def test_maven_build_serve_cache_and_log(
    tmp_path: Path, repo: tuple[Path, dict[str, bytes]]
) -> None:
    root, files = repo
    jar_path, pom_path = f"{HELLO_DIR}/hello-1.0.jar", f"{HELLO_DIR}/hello-1.0.pom"
    with maven_upstream(root) as upstream:
        async with _node(tmp_path, "a", upstream.url) as running, httpx.AsyncClient(
            base_url=running.url, trust_env=False, timeout=30
        ) as client:
            assert running.node.package_types["maven"].upstream == upstream.url
            # A miss builds from the upstream, then serves the verified bytes.
            resp = await client.get(f"/maven2/{jar_path}")
            assert resp.status_code == 200, resp.text
            assert resp.content == files[jar_path]
            assert resp.headers["content-type"] == "application/java-archive"
            fetched = upstream.count()
            assert upstream.count(".pom") == 1 and upstream.count(".jar") == 1
            # Everything of the GAV now comes from the node: no upstream request.
            pom = await client.get(f"/maven2/{pom_path}")
            assert pom.content == files[pom_path]
            again = await client.get(f"/maven2/{jar_path}")
            assert again.content == files[jar_path]
            sha1 = await client.get(f"/maven2/{jar_path}.sha1")
            md5 = await client.get(f"/maven2/{pom_path}.md5")
            head = await client.head(f"/maven2/{jar_path}")
            assert sha1.text == hashlib.sha1(files[jar_path]).hexdigest()
            assert md5.text == hashlib.md5(files[pom_path]).hexdigest()
            assert head.status_code == 200 and head.content == b""
            assert int(head.headers["content-length"]) == len(files[jar_path])
            assert upstream.count() == fetched
            # The log: one record per file, the seed's fields, package type Maven2.
            log = await client.get("/api/inspect-log/maven", params={"gav": HELLO})
            assert log.status_code == 200, log.text
            records = log.json()
            assert [list(r) for r in records] == [[n for n, _ in RECORD_FIELDS]] * 2
            assert {r["package_specific_artifact_id"] for r in records} == {jar_path, pom_path}
            for r in records:
                assert (r["package_type"], r["package_specific_id"]) == ("Maven2", HELLO)
                assert r["num_artifacts"] == 2
                want = files[r["package_specific_artifact_id"]]
                assert r["artifact_hash"] == hashlib.sha256(want).hexdigest()
                assert r["node_id"] == running.node.node_id
            # maven-metadata.xml lists the logged version and the upstream's.
            meta = await client.get("/maven2/com/example/hello/maven-metadata.xml")
            assert meta.status_code == 200, meta.text
            assert b"<version>1.0</version>" in meta.content
            assert b"<version>1.1</version>" not in meta.content  # the upstream has none
            assert b"<release>1.0</release>" in meta.content

            # A POM-packaged GAV has one record; a GAV whose jar is missing has its POM only.
            parent = await client.get("/maven2/com/example/parent/2/parent-2.pom")
            assert parent.status_code == 200
            nojar = await client.get("/maven2/com/example/nojar/1.0/nojar-1.0.jar")
            assert nojar.status_code == 404
            nojar_pom = await client.get("/maven2/com/example/nojar/1.0/nojar-1.0.pom")
            assert nojar_pom.status_code == 200
            assert len(await running.node.records_for_package("Maven2",
                                                              "com.example:parent:2")) == 1
            # Missing upstream -> 404; a file not in the GAV -> 404; bad paths -> 400.
            missing = await client.get("/maven2/com/example/nope/9/nope-9.jar")
            assert missing.status_code == 404
            assert "not found upstream" in missing.json()["errors"][0]["message"]
            sources = await client.get(f"/maven2/{HELLO_DIR}/hello-1.0-sources.jar")
            assert sources.status_code == 404
            # A classifier file the default build lacks is built (and logged) on request.
            tests_jar = f"{HELLO_DIR}/hello-1.0-tests.jar"
            (root / tests_jar).write_bytes(b"PK tests of hello")
            got = await client.get(f"/maven2/{tests_jar}")
            assert got.status_code == 200 and got.content == b"PK tests of hello"
            stored = await running.node.records_for_package("Maven2", HELLO)
            assert sorted(r.signed.record.package_specific_artifact_id for r in stored) == \
                sorted([jar_path, pom_path, tests_jar])
            assert await running.packages.rebuild_check(_block(stored)) is True
            for bad in ("/maven2/com/example/hello/1.0/other-1.0.jar",
                        "/maven2/a/../b/1/b-1.jar", "/maven2/x.jar",
                        "/maven2/com/example/snap/1.0-SNAPSHOT/snap-1.0-SNAPSHOT.jar"):
                assert (await client.get(bad)).status_code in (400, 404), bad
            assert (await client.get("/maven2/com/example/hello/1.0/other-1.0.jar")
                    ).status_code == 400
            assert (await client.put(f"/maven2/{jar_path}", content=b"x")).status_code == 405
            # Node API: bad GAV -> 400 with a clear message; existing -> 409; build -> 202.
            bad = await client.post("/api/build/maven", json={"gav": "junit"})
            assert bad.status_code == 400 and "group:artifact:version" in bad.json()["error"]
            exists = await client.post("/api/build/maven", json={"gav": HELLO})
            assert exists.status_code == 409
            built = await client.post("/api/build/maven", json={"gav": "com.example:hello:1.1"})
            assert built.status_code == 202, built.text
            build_url = f"/api/builds/{built.json()['build_id']}"

            async def done() -> bool:
                return bool((await client.get(build_url)).json()["status"] != "RUNNING")

            await _until(done)
            status = await client.get(build_url)
            assert status.json()["status"] == "SUCCESS", status.text
            meta = await client.get("/maven2/com/example/hello/maven-metadata.xml")
            assert b"<release>1.1</release>" in meta.content
            assert (await client.get("/api/inspect-log/maven", params={"gav": "a:b"})
                    ).status_code == 400
            assert (await client.get("/api/inspect-log/maven", params={"gav": "a:b:1"})
                    ).status_code == 404
            # Docker still answers on the same node.
            assert (await client.get("/v2/")).status_code == 200


@pytest.mark.anyio
async def test_tampered_upstream_is_detected(
    tmp_path: Path, repo: tuple[Path, dict[str, bytes]]
) -> None:
    root, files = repo
    jar_path = f"{HELLO_DIR}/hello-1.0.jar"
    pom_path = f"{HELLO_DIR}/hello-1.0.pom"
    with maven_upstream(root) as upstream:
        async with _node(tmp_path, "a", upstream.url) as running, httpx.AsyncClient(
            base_url=running.url, trust_env=False, timeout=30
        ) as client:
            assert (await client.get(f"/maven2/{jar_path}")).status_code == 200
            stored = await running.node.records_for_package("Maven2", HELLO)
            packages = running.packages
            assert packages is not None
            # A validator rebuilding the honest upstream agrees ...
            assert await packages.rebuild_check(_block(stored)) is True
            # ... and after the upstream changed the jar (keeping a matching .sha1), not.
            tampered = files[jar_path] + b"tampered"
            (root / jar_path).write_bytes(tampered)
            (root / f"{jar_path}.sha1").write_text(hashlib.sha1(tampered).hexdigest())
            assert await packages.rebuild_check(_block(stored)) is False
            # The node still serves the logged bytes from its store ...
            assert (await client.get(f"/maven2/{jar_path}")).content == files[jar_path]
            # ... and once they are gone, refuses the upstream's new bytes.
            assert await running.node.blobs.delete(Digest.of(files[jar_path]))
            resp = await client.get(f"/maven2/{jar_path}")
            assert resp.status_code == 502
            assert "not served" in resp.json()["errors"][0]["message"]
            assert tampered not in resp.content
            # An evicted POM whose upstream is unchanged is fetched again and served.
            assert await running.node.blobs.delete(Digest.of(files[pom_path]))
            assert (await client.get(f"/maven2/{pom_path}")).content == files[pom_path]
            # A tampered POM (its .sha1 published as well) is refused in a new build.
            hello11 = "com/example/hello/1.1/hello-1.1.pom"
            (root / hello11).write_bytes(files[hello11].replace(b"1.1", b"6.6"))
            bad = await client.get(f"/maven2/{hello11}")
            assert bad.status_code == 502 and "names version" in bad.text
            assert not await running.node.records_for_package("Maven2", "com.example:hello:1.1")


async def _stored(running: Any, digest: Digest) -> bool:
    return await running.node.local_blob(digest) is not None


@pytest.mark.anyio
async def test_regular_node_gets_maven_artifacts_from_a_peer(
    tmp_path: Path, repo: tuple[Path, dict[str, bytes]]
) -> None:
    root, files = repo
    jar_path = f"{HELLO_DIR}/hello-1.0.jar"
    with maven_upstream(root) as upstream:
        async with _node(tmp_path, "a", upstream.url) as a, _node(
            tmp_path, "b", None, peers=(a.url,)
        ) as b, httpx.AsyncClient(trust_env=False, timeout=30) as client:
            assert not b.node.is_build_node
            resp = await client.get(f"{a.url}/maven2/{jar_path}")
            assert resp.status_code == 200
            fetched = upstream.count()
            async def synced(package_id: str = HELLO) -> bool:  # B syncs A's ledger
                return bool(await b.node.records_for_package("Maven2", package_id))

            await _until(synced)
            via_b = await client.get(f"{b.url}/maven2/{jar_path}")
            assert via_b.status_code == 200, via_b.text
            assert via_b.content == files[jar_path]
            # The client had it as soon as it verified; B keeps it once its store took it.
            jar = Digest.of(files[jar_path])
            await _until(lambda: _stored(b, jar))
            assert upstream.count() == fetched  # from the peer, not the upstream
            log = await client.get(f"{b.url}/api/inspect-log/maven", params={"gav": HELLO})
            assert len(log.json()) == 2
            # A GAV nobody built: B asks its build node and answers 404 at once.
            miss = await client.get(f"{b.url}/maven2/com/example/parent/2/parent-2.pom")
            assert miss.status_code == 404
            assert "requested from a build node" in miss.json()["errors"][0]["message"]
            # ... A builds it, and B's next request succeeds.
            await _until(lambda: synced("com.example:parent:2"))
            ok = await client.get(f"{b.url}/maven2/com/example/parent/2/parent-2.pom")
            assert ok.status_code == 200
            assert ok.content == files["com/example/parent/2/parent-2.pom"]


@pytest.mark.anyio
async def test_cli_build_and_inspect_log_maven(
    tmp_path: Path, repo: tuple[Path, dict[str, bytes]]
) -> None:
    root, files = repo
    with maven_upstream(root) as upstream:
        async with _node(tmp_path, "a", upstream.url) as running:
            port = running.port
            assert port is not None

            def cli(*args: str) -> Any:
                return run_cli(tmp_path / "cli", *args, port=port)

            out = await anyio.to_thread.run_sync(cli, "build", "maven", "--gav", HELLO)
            assert out.returncode == 0, out.stderr
            assert "Build request successfully handled" in out.stdout
            build_id = out.stdout.split("Build with ID ", 1)[1].split()[0]
            async def finished() -> bool:
                return bool(running.node.builds[build_id].status != "RUNNING")

            await _until(finished)
            out = await anyio.to_thread.run_sync(cli, "inspect-log", "maven", "--gav", HELLO)
            assert out.returncode == 0, out.stderr
            records = json.loads(out.stdout)
            assert len(records) == 2
            assert [list(r) for r in records] == [[n for n, _ in RECORD_FIELDS]] * 2
            assert {r["artifact_hash"] for r in records} == {
                hashlib.sha256(files[f"{HELLO_DIR}/hello-1.0.{e}"]).hexdigest()
                for e in ("jar", "pom")}
            again = await anyio.to_thread.run_sync(cli, "build", "maven", "--gav", HELLO)
            assert again.returncode != 0 and "already exists" in again.stderr
            bad = await anyio.to_thread.run_sync(cli, "build", "maven", "--gav", "not-a-gav")
            assert bad.returncode != 0 and "group:artifact:version" in bad.stderr
            none = await anyio.to_thread.run_sync(cli, "inspect-log", "maven", "--gav",
                                                  "com.example:nope:1")
            assert none.returncode != 0 and "no transparency log records" in none.stderr


# --------------------------------------------------------------------------- conformance


def _pom(group: str, artifact: str, version: str) -> bytes:
    return (f'<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0'
            f"</modelVersion><groupId>{group}</groupId><artifactId>{artifact}</artifactId>"
            f"<version>{version}</version></project>").encode()


class TestMavenConformance(PackageTypeConformance):
    @pytest.fixture
    def upstream(self, tmp_path: Path) -> Iterator[tuple[MavenRepoServer, dict[str, bytes]]]:
        files = _repo(tmp_path / "upstream")
        with maven_upstream(tmp_path / "upstream") as server:
            yield server, files

    @pytest.fixture
    def package_type(self, upstream: tuple[MavenRepoServer, dict[str, bytes]]) -> PackageType:
        created: PackageType = plugins.create("pyrsia.package_type", "maven",
                                              {"upstream": upstream[0].url})
        assert isinstance(created, MavenPackageType)
        return created

    @pytest.fixture
    def valid_ids(self) -> list[str]:
        return ["junit:junit:4.13.2", " org.apache.maven.plugins:maven-dependency-plugin:3.5.0 ",
                "com.example:hello:1.0-beta+1", "x:y:1"]

    @pytest.fixture
    def invalid_ids(self) -> list[str]:
        return ["", "junit", "junit:junit", "a:b:c:d", "a/b:c:1", "a..b:c:1", "a:b:1/2",
                "a:b:1.0-SNAPSHOT", "a:b:..", "a b:c:1", "a:b:" + "1" * 600]

    @pytest.fixture
    def samples(self) -> list[tuple[bytes, str, list[str]]]:
        return [(_pom("junit", "junit", "4.13.2"), "application/xml", []),
                (_pom("com.example", "hello", "1.0"), "text/xml", [])]

    @pytest.fixture
    def builds(
        self, upstream: tuple[MavenRepoServer, dict[str, bytes]]
    ) -> list[tuple[str, dict[str, Digest]]]:
        files = upstream[1]

        def of(*paths: str) -> dict[str, Digest]:
            return {p: Digest.of(files[p]) for p in paths}

        return [
            (HELLO, of(f"{HELLO_DIR}/hello-1.0.pom", f"{HELLO_DIR}/hello-1.0.jar")),
            ("com.example:parent:2", of("com/example/parent/2/parent-2.pom")),
            ("com.example:nojar:1.0", of("com/example/nojar/1.0/nojar-1.0.pom")),
        ]

    @pytest.fixture
    def missing_packages(self) -> list[str]:
        return ["com.example:nope:1", "com.example:hello:9"]

    @pytest.fixture
    def requests(
        self, upstream: tuple[MavenRepoServer, dict[str, bytes]]
    ) -> list[tuple[str, str, int, bytes | None]]:
        files = upstream[1]
        jar = f"{HELLO_DIR}/hello-1.0.jar"
        return [
            ("GET", f"/maven2/{jar}", 200, files[jar]),
            ("HEAD", f"/maven2/{jar}", 200, None),
            ("GET", f"/maven2/{jar}.sha1", 200, hashlib.sha1(files[jar]).hexdigest().encode()),
            ("GET", "/maven2/com/example/nope/1/nope-1.pom", 404, None),
            ("GET", "/maven2/com/example/hello/1.0/other-1.0.jar", 400, None),
            ("GET", "/maven2/com/example/hello/maven-metadata.xml", 200, None),
            ("DELETE", f"/maven2/{jar}", 405, None),
        ]
