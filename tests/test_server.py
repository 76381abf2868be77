"""The node's HTTP/1.1 server for ASGI apps (``pyrsia_registry._server``)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

try:
    from pyrsia_registry import _server
except ImportError:  # the distribution is not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pyrsia_registry" / "src"))
    sys.modules.pop("pyrsia_registry", None)  # a namespace package found via the repo root
    from pyrsia_registry import _server

ASGIApp = _server.ASGIApp
Message = _server.Message
Receive = _server.Receive
Scope = _server.Scope
Send = _server.Send
Server = _server.Server
serve = _server.serve

pytestmark = pytest.mark.anyio

BIG = 8 * 1024 * 1024 + 12345  # not a multiple of any buffer size


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("blobs") / "big.bin"
    path.write_bytes(os.urandom(BIG))
    return path


@pytest.fixture(scope="module")
def huge_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Larger than any socket buffer on loopback, so a download is still running when cut."""
    path = tmp_path_factory.mktemp("blobs") / "huge.bin"
    with path.open("wb") as f:
        chunk = os.urandom(1024 * 1024)
        for _ in range(96):
            f.write(chunk)
    return path


class App:
    """A test app; records what it saw."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self.clients: list[Any] = []
        self.scopes: list[Scope] = []
        self.disconnected = anyio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send, scope)
            return
        assert scope["type"] == "http"
        self.clients.append(scope["client"])
        self.scopes.append(scope)
        path = scope["path"]
        if path == "/hello":
            await text(send, b"hello", extra=[(b"x-method", scope["method"].encode())])
        elif path == "/chunked":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for part in (b"one,", b"two,", b"three"):
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        elif path == "/echo":
            digest = hashlib.sha256()
            total = 0
            messages = 0
            while True:
                message = await receive()
                assert message["type"] == "http.request"
                digest.update(message["body"])
                total += len(message["body"])
                messages += 1
                if not message.get("more_body", False):
                    break
            reply = {"sha256": digest.hexdigest(), "length": total, "messages": messages}
            await text(send, json.dumps(reply).encode())
        elif path.startswith("/file/"):
            name = path.removeprefix("/file/")
            size = self.files[name].stat().st_size
            headers = [(b"content-length", str(size).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.pathsend", "path": str(self.files[name])})
        elif path == "/range":
            file = self.files["big"]
            start, count = 1000, 3 * 1024 * 1024
            headers = [
                (b"content-length", str(count).encode()),
                (b"content-range", f"bytes {start}-{start + count - 1}/{BIG}".encode()),
            ]
            await send({"type": "http.response.start", "status": 206, "headers": headers})
            await send(
                {"type": "pyrsia.sendfile", "path": str(file), "offset": start, "count": count}
            )
        elif path == "/range-chunked":  # no Content-Length: h11 frames the segments as chunks
            name = str(self.files["big"])
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"<", "more_body": True})
            segment = {"type": "pyrsia.sendfile", "path": name, "offset": 5, "count": 10}
            await send({**segment, "more_body": True})
            await send({"type": "pyrsia.sendfile", "path": name, "offset": 0, "count": 3})
        elif path == "/missing-file":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.pathsend", "path": "/nonexistent/blob"})
        elif path == "/boom":
            raise RuntimeError("boom")
        elif path == "/boom-late":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            raise RuntimeError("boom after the head")
        elif path == "/headers":
            body = json.dumps([[k.decode(), v.decode()] for k, v in scope["headers"]]).encode()
            await text(send, body)
        elif path == "/wait-disconnect":
            message = await receive()
            assert message["type"] == "http.request"
            message = await receive()  # blocks until the client leaves
            assert message["type"] == "http.disconnect"
            self.disconnected.set()
        elif path == "/state":
            await text(send, json.dumps(scope["state"]).encode())
        elif path == "/slow":
            await anyio.sleep(0.3)
            await text(send, b"slow done")
        else:
            await text(send, b"not found", status=404)

    async def lifespan(self, receive: Receive, send: Send, scope: Scope) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                scope["state"]["started"] = True
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


async def text(
    send: Send, body: bytes, *, status: int = 200, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send(
        {"type": "http.response.start", "status": status, "headers": headers + (extra or [])}
    )
    await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def running(app: ASGIApp, **options: Any) -> AsyncIterator[Server]:
    server = Server(app, host="127.0.0.1", port=0, **options)
    async with anyio.create_task_group() as tg:
        await tg.start(_serve, server)
        yield server
        tg.cancel_scope.cancel()


async def _serve(server: Server, *, task_status: anyio.abc.TaskStatus[int]) -> None:
    await server.serve(task_status=task_status)


@pytest.fixture
def app(big_file: Path, huge_file: Path) -> App:
    return App({"big": big_file, "huge": huge_file})


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    with anyio.fail_after(10):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(data)
            reply = b""
            try:
                while True:
                    reply += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
    return reply


def client_hello() -> bytes:
    """The first flight of a real TLS client, as the docker CLI sends it to a mirror."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16"  # a handshake record
    return hello


async def test_serve_reports_port_and_answers(app: App) -> None:
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve, app, "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            response = await client.get("/hello")
        assert response.status_code == 200
        assert response.text == "hello"
        assert "date" in response.headers
        tg.cancel_scope.cancel()


async def test_get_head_and_keep_alive(app: App) -> None:
    async with running(app) as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            get = await client.get("/hello")
            head = await client.head("/hello")
            again = await client.get("/hello?x=1")
        assert get.status_code == head.status_code == again.status_code == 200
        assert get.content == b"hello"
        assert head.content == b""
        assert head.headers["content-length"] == "5"  # the app's headers, without a body
        assert head.headers["x-method"] == "HEAD"
        assert app.scopes[2]["query_string"] == b"x=1"
        assert app.scopes[2]["path"] == "/hello"
        assert set(app.scopes[0]["extensions"]) >= {"http.response.pathsend", "pyrsia.sendfile"}
        assert len(set(app.clients)) == 1  # one connection, kept alive


async def test_head_on_a_file_sends_no_body(app: App, big_file: Path) -> None:
    async with running(app) as server:
        reply = await raw_exchange(
            server.port,
            b"HEAD /file/big HTTP/1.1\r\nhost: x\r\n\r\n"
            b"GET /hello HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
    head, _, rest = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert f"content-length: {BIG}".encode() in head.lower()
    assert rest.startswith(b"HTTP/1.1 200")  # the next response follows the head directly
    assert rest.endswith(b"hello")


async def test_chunked_when_no_content_length(app: App) -> None:
    async with running(app) as server:
        reply = await raw_exchange(
            server.port, b"GET /chunked HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        )
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert body == b"4\r\none,\r\n4\r\ntwo,\r\n5\r\nthree\r\n0\r\n\r\n"


async def test_request_body_is_streamed(app: App) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 7)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 256 * 1024):
            yield payload[i : i + 256 * 1024]

    async with running(app) as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            fixed = await client.post("/echo", content=payload)
            chunked = await client.post("/echo", content=chunks())
    for response in (fixed, chunked):
        reply = response.json()
        assert reply["length"] == len(payload)
        assert reply["sha256"] == hashlib.sha256(payload).hexdigest()
        assert reply["messages"] > 1  # delivered in pieces, not buffered whole


async def test_pathsend_big_file(app: App, big_file: Path) -> None:
    async with running(app) as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            response = await client.get("/file/big")
            second = await client.get("/hello")  # the connection is still in sync
    assert response.status_code == 200
    assert response.headers["content-length"] == str(BIG)
    assert response.content == await anyio.Path(big_file).read_bytes()
    assert second.content == b"hello"
    assert len(set(app.clients)) == 1


async def test_sendfile_range_206(app: App, big_file: Path) -> None:
    async with running(app) as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            response = await client.get("/range")
            chunked = await client.get("/range-chunked")
    data = await anyio.Path(big_file).read_bytes()
    assert response.status_code == 206
    assert response.content == data[1000 : 1000 + 3 * 1024 * 1024]
    assert chunked.headers["transfer-encoding"] == "chunked"
    assert chunked.content == b"<" + data[5:15] + data[0:3]


async def test_tls_client_hello_gets_http_400(app: App) -> None:
    async with running(app) as server:
        reply = await raw_exchange(server.port, client_hello())
    assert reply.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in reply.lower()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /hello HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /hello HTTP/1.1\r\nhost: x\r\ncontent-length: nope\r\n\r\n",
        b"\x00\x01\x02\x03binary\r\n\r\n",
    ],
)
async def test_malformed_request_gets_400(app: App, request_bytes: bytes) -> None:
    async with running(app) as server:
        reply = await raw_exchange(server.port, request_bytes)
        assert reply.startswith(b"HTTP/1.1 400 ")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            assert (await client.get("/hello")).status_code == 200


async def test_oversized_headers_get_431(app: App) -> None:
    async with running(app) as server:
        big_header = b"x-big: " + b"a" * (100 * 1024) + b"\r\n"
        reply = await raw_exchange(
            server.port, b"GET /hello HTTP/1.1\r\nhost: x\r\n" + big_header + b"\r\n"
        )
    assert reply.startswith((b"HTTP/1.1 431 ", b"HTTP/1.1 400 "))


async def test_app_exception_gives_500_and_is_logged(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="pyrsia.server")
    async with running(app) as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            response = await client.get("/boom")
            assert response.status_code == 500
            with pytest.raises(httpx.RemoteProtocolError):  # head sent: the body is cut short
                await client.get("/boom-late")
            assert (await client.get("/missing-file")).status_code == 500
            assert (await client.get("/hello")).status_code == 200
    errors = [r for r in caplog.records if r.name == "pyrsia.server"]
    assert len(errors) == 3
    assert errors[0].exc_info is not None and "boom" in str(errors[0].exc_info[1])


async def test_client_disconnect_mid_download(app: App, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pyrsia.server")
    async with running(app) as server:
        with anyio.fail_after(10):
            for _ in range(3):
                stream = await anyio.connect_tcp("127.0.0.1", server.port)
                await stream.send(b"GET /file/huge HTTP/1.1\r\nhost: x\r\n\r\n")
                got = 0
                while got < 1024 * 1024:
                    got += len(await stream.receive())
                await stream.aclose()
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
                response = await client.get("/file/big")
                assert response.status_code == 200 and len(response.content) == BIG
    assert not caplog.records  # a client leaving is not an error


async def test_disconnect_is_delivered(app: App) -> None:
    async with running(app) as server:
        with anyio.fail_after(5):
            stream = await anyio.connect_tcp("127.0.0.1", server.port)
            await stream.send(b"GET /wait-disconnect HTTP/1.1\r\nhost: x\r\n\r\n")
            await anyio.sleep(0.05)
            assert not app.disconnected.is_set()
            await stream.aclose()
            await app.disconnected.wait()


async def test_many_accept_lines_reach_the_app_separately(app: App) -> None:
    accepts = [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.index.v1+json",
    ]
    request = b"GET /headers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    request += b"".join(b"Accept: " + a.encode() + b"\r\n" for a in accepts) + b"\r\n"
    async with running(app) as server:
        reply = await raw_exchange(server.port, request)
    headers = json.loads(reply.partition(b"\r\n\r\n")[2])
    assert [v for k, v in headers if k == "accept"] == accepts


async def test_pipelined_requests_are_answered_in_order(app: App) -> None:
    async with running(app) as server:
        reply = await raw_exchange(
            server.port,
            b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n"
            b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n"
            b"GET /nope HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
    first = reply.index(b"slow done")
    second = reply.index(b"hello")
    third = reply.index(b"HTTP/1.1 404")
    assert first < second < third


async def test_expect_100_continue(app: App) -> None:
    async with running(app) as server:
        with anyio.fail_after(5):
            async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
                await stream.send(
                    b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n"
                    b"expect: 100-continue\r\nconnection: close\r\n\r\n"
                )
                interim = await stream.receive()
                assert interim.startswith(b"HTTP/1.1 100 ")
                await stream.send(b"abc")
                reply = b""
                try:
                    while True:
                        reply += await stream.receive()
                except anyio.EndOfStream:
                    pass
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert b'"length": 3' in reply


async def test_idle_connection_is_closed(app: App) -> None:
    async with running(app, idle_timeout=0.2) as server:
        with anyio.fail_after(3):
            async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
                with pytest.raises(anyio.EndOfStream):
                    await stream.receive()


async def test_incomplete_request_head_times_out_with_408(app: App) -> None:
    async with running(app, idle_timeout=0.2) as server:
        reply = await raw_exchange(server.port, b"GET /hello HTTP/1.1\r\nhost: x\r\n")
    assert reply.startswith(b"HTTP/1.1 408 ")


async def test_lifespan_state_reaches_requests(app: App) -> None:
    async with running(app) as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            assert (await client.get("/state")).json() == {"started": True}


async def test_graceful_shutdown_finishes_the_response_in_flight(app: App) -> None:
    server = Server(app, host="127.0.0.1", port=0)
    server_scope = anyio.CancelScope()
    replies: list[httpx.Response] = []

    async def run_server(*, task_status: anyio.abc.TaskStatus[int]) -> None:
        with server_scope:
            await server.serve(task_status=task_status)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(run_server)
            base = f"http://127.0.0.1:{server.port}"
            async with (
                httpx.AsyncClient(base_url=base) as client,
                httpx.AsyncClient(base_url=base) as idle,
            ):
                assert (await idle.get("/hello")).status_code == 200  # an idle keep-alive

                done = anyio.Event()

                async def fetch() -> None:
                    replies.append(await client.get("/slow"))
                    done.set()

                tg.start_soon(fetch)
                await anyio.sleep(0.1)
                server_scope.cancel()  # shut down while /slow runs
                await done.wait()
    assert replies[0].text == "slow done"
    assert replies[0].headers["connection"] == "close"


async def test_half_closed_client_still_gets_its_response(app: App, big_file: Path) -> None:
    async with running(app) as server:
        with anyio.fail_after(5):
            async with await anyio.connect_tcp("127.0.0.1", server.port) as stream:
                await stream.send(b"GET /file/big HTTP/1.0\r\n\r\n")
                await stream.send_eof()
                reply = bytearray()
                try:
                    while True:
                        reply += await stream.receive()
                except anyio.EndOfStream:
                    pass
    head, _, body = bytes(reply).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert body == await anyio.Path(big_file).read_bytes()


async def test_app_without_lifespan_support(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pyrsia.server")

    async def plain(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"  # raises for "lifespan", as many apps do
        await text(send, b"plain")

    async with running(plain) as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            assert (await client.get("/")).text == "plain"
    assert not caplog.records
