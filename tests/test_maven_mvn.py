"""The real ``mvn`` client resolves through a pyrsia node (``settings.xml`` mirror).

The node's Maven upstream is a read-only view, served on 127.0.0.1, of the machine's
Maven repositories: Debian's ``/usr/share/maven-repo`` (``maven``,
``libmaven-dependency-plugin-java``, ``junit4``; installed by ``.ci/setup.sh``) and
``~/.m2/repository``. Nothing else is reachable: the mirror is ``<mirrorOf>*``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import anyio
import httpx
import pytest
from support.maven import maven_upstream
from support.net import free_port

pytestmark = pytest.mark.process
GAV = "junit:junit:4.13.2"
JAR = "junit/junit/4.13.2/junit-4.13.2.jar"
ROOTS = [Path("/usr/share/maven-repo"), Path.home() / ".m2" / "repository"]
MVN_TIMEOUT = 300


def _settings(path: Path, node_url: str) -> Path:
    path.write_text(f"""<settings>
  <mirrors>
    <mirror><id>pyrsia</id><mirrorOf>*</mirrorOf><url>{node_url}/maven2</url></mirror>
  </mirrors>
</settings>
""")
    return path


def _mvn(settings: Path, local_repo: Path, log: Path) -> tuple[int, float]:
    start = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.run(
            ["mvn", "-B", "-q", "-s", str(settings), f"-Dmaven.repo.local={local_repo}",
             "dependency:get", f"-Dartifact={GAV}"],
            stdout=out, stderr=subprocess.STDOUT, timeout=MVN_TIMEOUT, cwd=log.parent,
        )
    return proc.returncode, time.monotonic() - start


@pytest.mark.anyio
async def test_mvn_dependency_get_through_a_node(tmp_path: Path) -> None:
    from pyrsia_registry import NodeConfig, start_node

    assert shutil.which("mvn"), "Apache Maven (Debian package maven) is needed: .ci/setup.sh"
    for root in ROOTS:
        assert root.is_dir(), f"{root} is missing (see .ci/setup.sh)"
    with maven_upstream(*ROOTS) as upstream:
        upstream_jar = upstream.read(JAR)
        assert upstream_jar is not None, f"{JAR} is not in {ROOTS}"
        config = NodeConfig(host="127.0.0.1", port=free_port(), data_dir=tmp_path / "node",
                            upstream=None, plugin_timeout=120,
                            package_options={"maven": {"upstream": upstream.url}})
        async with start_node(config) as running:
            settings = _settings(tmp_path / "settings.xml", running.url)
            # A fresh, empty local repository: every file comes through the node.
            rc, first = await anyio.to_thread.run_sync(
                _mvn, settings, tmp_path / "repo1", tmp_path / "mvn1.log")
            log1 = (tmp_path / "mvn1.log").read_text(errors="replace")
            assert rc == 0, log1[-4000:]
            got = (tmp_path / "repo1" / JAR).read_bytes()
            assert got == upstream_jar
            fetched = upstream.count()
            assert fetched > 0 and upstream.count(JAR) == 1
            async with httpx.AsyncClient(base_url=running.url, trust_env=False) as client:
                records = (await client.get("/api/inspect-log/maven",
                                            params={"gav": GAV})).json()
            assert {r["package_specific_artifact_id"] for r in records} == {
                JAR, JAR.replace(".jar", ".pom")}
            assert all(r["package_type"] == "Maven2" for r in records)
            def built() -> set[str]:
                return {b.package_id for b in running.node.builds.values()
                        if b.status == "SUCCESS"}

            gavs = built()
            assert GAV in gavs
            # Again into another empty local repository: served from the node's cache.
            rc, second = await anyio.to_thread.run_sync(
                _mvn, settings, tmp_path / "repo2", tmp_path / "mvn2.log")
            log2 = (tmp_path / "mvn2.log").read_text(errors="replace")
            assert rc == 0, log2[-4000:]
            assert (tmp_path / "repo2" / JAR).read_bytes() == upstream_jar
            # Every file the upstream has now comes from the node; only misses (files the
            # upstream does not have, e.g. an absent parent POM) are asked again.
            again = upstream.requests[fetched:]
            assert all(upstream.read(path) is None for path in again), again
            assert built() == gavs  # nothing new was built
    print(f"\nmvn dependency:get {GAV} through pyrsia: {first:.1f} s with {len(gavs)} builds "
          f"({fetched} upstream requests), {second:.1f} s from the node's cache "
          f"({len(again)} upstream requests, all misses)")
