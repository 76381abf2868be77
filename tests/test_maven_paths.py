"""Path tricks on the Maven routes of a real node (issue: hostile peers and clients).

Raw HTTP requests (no client normalises the path) with dot segments, encoded dots and
slashes, backslashes, NUL bytes, doubled slashes, invalid UTF-8 and overlong paths: each
gets a clear 4xx JSON answer, the node keeps serving, and its Maven upstream never sees a
request outside the repository layout.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
from support.maven import MavenRepoServer, maven_upstream, write_gav
from support.node import NodeProcess

pytestmark = pytest.mark.process

TRICKS = [
    "/maven2/../api/status",
    "/maven2/../../etc/passwd",
    "/maven2/%2e%2e/%2e%2e/etc/passwd",
    "/maven2/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "/maven2/com/example/hello/1.0/..%2f..%2f..%2fhello-1.0.jar",
    "/maven2/com/example/hello/1.0/%2e%2e/1.0/hello-1.0.jar",
    "/maven2/%252e%252e/%252e%252e/etc/passwd",
    "/maven2//etc/passwd",
    "/maven2/com//example/hello/1.0/hello-1.0.jar",
    "/maven2/com\\example\\hello\\1.0\\hello-1.0.jar",
    "/maven2/com/example/hello/1.0/hello-1.0.jar%00.txt",
    "/maven2/com/example/hello/1.0/hello-1.0.jar\\..\\..\\x",
    "/maven2/%ff%fe/hello/1.0/hello-1.0.jar",
    "/maven2/./com/example/hello/1.0/hello-1.0.jar",
    "/maven2/com/example/hello/1.0/./hello-1.0.jar",
    "/maven2/file:///etc/passwd",
    "/maven2/http://127.0.0.1:1/x/1/x-1.jar",
    "/maven2/" + "a/" * 3000 + "x-1.jar",
    "/maven2/com/example/hello/" + "9" * 5000 + "/hello-1.jar",
]


def raw_get(port: int, target: str) -> tuple[int, bytes]:
    """``GET target`` exactly as given; the status and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                     "Connection: close\r\n\r\n".encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.fixture(scope="module")
def maven_node(tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[NodeProcess, MavenRepoServer]]:
    base = tmp_path_factory.mktemp("maven-paths")
    root = base / "repo"
    write_gav(root, "com.example", "hello", "1.0")
    (base / "secret").write_text("not for clients")
    with maven_upstream(root) as upstream, NodeProcess(base / "node", extra=(
            "--package-option", f"maven.upstream={upstream.url}")) as node:
        yield node, upstream


@pytest.mark.parametrize("target", TRICKS, ids=range(len(TRICKS)))
def test_path_tricks_get_a_clear_error_and_reach_no_upstream(
    maven_node: tuple[NodeProcess, MavenRepoServer], target: str
) -> None:
    node, upstream = maven_node
    before = len(upstream.requests)
    status, body = raw_get(node.port, target)
    assert 400 <= status < 500, (target[:120], status, body[:200])
    if body:
        json.loads(body)  # a JSON error (or the registry's error document), never HTML
    assert b"Traceback" not in body and b"not for clients" not in body
    for path in upstream.requests[before:]:
        assert ".." not in path and "%" not in path and "//" not in path and "\\" not in path
        assert path.startswith("/com/example/hello/1.0/"), path


def test_the_node_still_serves_and_logged_no_traceback(
    maven_node: tuple[NodeProcess, MavenRepoServer]
) -> None:
    node, _ = maven_node
    status, body = raw_get(node.port, "/maven2/com/example/hello/1.0/hello-1.0.pom")
    assert status == 200 and b"<artifactId>hello</artifactId>" in body
    assert "Traceback" not in node.log()
