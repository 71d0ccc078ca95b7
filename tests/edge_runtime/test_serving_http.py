"""The model server's own HTTP/1.1 layer (edge_runtime.serving.http), byte for byte over loopback sockets.

Each test writes raw bytes with ``socket.create_connection`` to a real server
(real onnxruntime behind it), so that keep-alive, pipelining, framing and the
connection's end are exactly what the server does, with no client library
smoothing them over.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.serving.http import MAX_HEAD_BYTES
from tests.edge_runtime import onnx_models as om

LIMIT = 4096
TIMEOUT_S = 10.0
X1 = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=np.float32)
X2 = np.array([[-1, 0.5, 2, -3]], dtype=np.float32)


# A raw HTTP/1.1 client -------------------------------------------------------------

@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Wire:
    """One TCP connection to the server; reads responses one after another from the same byte stream."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
        self.buf = bytearray()

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise AssertionError(f"the server closed the connection mid-response (have {bytes(self.buf[:200])!r})")
        self.buf += data

    def read_until(self, marker: bytes) -> bytes:
        """Everything up to and including ``marker``."""
        while (i := self.buf.find(marker)) < 0:
            self._fill()
        end = i + len(marker)
        data = bytes(self.buf[:end])
        del self.buf[:end]
        return data

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_response(self, *, head: bool = False) -> Response:
        """One response: status line, headers up to CRLFCRLF, then content-length bytes (none for HEAD)."""
        status_line, *lines = self.read_until(b"\r\n\r\n")[:-4].decode("latin-1").split("\r\n")
        version, status, reason = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers: dict[str, str] = {}
        for line in lines:
            name, value = line.split(":", 1)
            assert name.lower() not in headers, f"header {name} twice"
            headers[name.lower()] = value.strip()
        assert "transfer-encoding" not in headers
        body = b"" if head else self.read_exact(int(headers["content-length"]))
        return Response(int(status), reason, headers, body)

    def assert_closed(self) -> None:
        """The server closes the connection: nothing more comes, then the end of the stream."""
        assert not self.buf, f"unexpected bytes after the last response: {bytes(self.buf[:200])!r}"
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            return
        assert data == b"", f"expected the connection to be closed, got {data[:200]!r}"

    def nothing_to_read(self) -> bool:
        """True if no byte has arrived (without waiting)."""
        if self.buf:
            return False
        self.sock.setblocking(False)
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(TIMEOUT_S)
        return False


def request(method: str, path: str, body: bytes | None = None, *, headers: dict[str, str] | None = None,
            version: str = "HTTP/1.1") -> bytes:
    """The bytes of one request; ``Content-Length`` is added for a body unless headers frame it already."""
    lines = [f"{method} {path} {version}", "Host: 127.0.0.1"]
    all_headers = dict(headers or {})
    if body is not None and "Transfer-Encoding" not in all_headers and "Content-Length" not in all_headers:
        all_headers["Content-Length"] = str(len(body))
    lines += [f"{name}: {value}" for name, value in all_headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def mlp_body(x: np.ndarray, request_id: str | None = None) -> bytes:
    doc: dict[str, Any] = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}]}
    if request_id is not None:
        doc["id"] = request_id
    return json.dumps(doc).encode()


def infer(x: np.ndarray, request_id: str | None = None, model: str = "mlp") -> bytes:
    return request("POST", f"/v2/models/{model}/infer", mlp_body(x, request_id),
                   headers={"Content-Type": "application/json"})


def chunked(body: bytes, size: int) -> bytes:
    """``body`` in chunked transfer coding, ``size`` bytes a chunk, with the last (empty) chunk."""
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def assert_mlp_answer(response: Response, x: np.ndarray, request_id: str | None = None) -> None:
    assert response.status == 200, (response.status, response.body[:500])
    assert response.headers["content-type"] == "application/json"
    doc = response.json()
    assert doc["model_name"] == "mlp"
    if request_id is not None:
        assert doc["id"] == request_id
    [out] = doc["outputs"]
    assert out["name"] == "y" and out["shape"] == [x.shape[0], 3]
    np.testing.assert_allclose(np.array(out["data"]).reshape(x.shape[0], 3), om.mlp_expected(x), rtol=1e-5)


def assert_refused_or_closed_without_answer(port: int) -> None:
    try:
        wire = Wire(port)
    except ConnectionRefusedError:
        return
    with wire:
        try:
            wire.send(request("GET", "/v2/health/live"))
        except (BrokenPipeError, ConnectionResetError):
            return
        wire.assert_closed()


# Servers ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    om.mlp(directory / "mlp.onnx")
    return directory


@pytest.fixture(scope="module")
def server(models: Path) -> Iterator[om.ServerUnderTest]:
    """Serves ``mlp``, with a request body limit of 4 KiB."""
    srv = om.ServerUnderTest(max_body_bytes=LIMIT)
    try:
        assert srv.load("mlp", "1", models / "mlp.onnx").state == "serving"
        assert srv.handle.app.max_body_bytes == LIMIT
        yield srv
    finally:
        srv.close()


@pytest.fixture()
def port(server: om.ServerUnderTest) -> int:
    return server.handle.port


@pytest.fixture()
def wire(port: int) -> Iterator[Wire]:
    with Wire(port) as w:
        yield w


# Tests -----------------------------------------------------------------------------

def test_it_keeps_a_connection_alive_across_requests(wire: Wire) -> None:
    wire.send(request("GET", "/v2/health/live"))
    live = wire.read_response()
    assert live.status == 200
    assert "connection" not in live.headers
    wire.send(infer(X1, "second"))
    answer = wire.read_response()
    assert_mlp_answer(answer, X1, "second")
    assert "connection" not in answer.headers
    # And a third, to show the connection is still usable after an inference.
    wire.send(request("GET", "/v2/health/ready"))
    assert wire.read_response().status == 200


def test_it_answers_pipelined_requests_in_order(wire: Wire) -> None:
    wire.send(infer(X1, "first") + request("GET", "/v2") + infer(X2, "third"))
    first, second, third = (wire.read_response() for _ in range(3))
    assert_mlp_answer(first, X1, "first")
    assert second.status == 200
    assert second.json()["name"] == "edgewise-edge-runtime"
    assert_mlp_answer(third, X2, "third")
    assert not wire.buf


def test_it_sends_100_continue_before_the_body(wire: Wire) -> None:
    body = mlp_body(X1, "expecting")
    head = request("POST", "/v2/models/mlp/infer", headers={"Content-Type": "application/json",
                                                            "Content-Length": str(len(body)),
                                                            "Expect": "100-continue"})
    wire.send(head)
    assert wire.read_until(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    wire.send(body)
    assert_mlp_answer(wire.read_response(), X1, "expecting")


def test_it_reads_a_chunked_request_body(wire: Wire) -> None:
    body = mlp_body(X1, "chunked")
    head = request("POST", "/v2/models/mlp/infer", headers={"Content-Type": "application/json",
                                                            "Transfer-Encoding": "chunked"})
    encoded = chunked(body, 17)
    assert encoded.count(b"\r\n") > 10  # several chunks
    # The head, then the chunks in two writes, cut in the middle of a chunk.
    wire.send(head + encoded[:40])
    wire.send(encoded[40:])
    assert_mlp_answer(wire.read_response(), X1, "chunked")
    wire.send(request("GET", "/v2/health/live"))
    assert wire.read_response().status == 200


def test_it_refuses_a_declared_length_over_the_limit_and_keeps_the_connection(wire: Wire) -> None:
    declared = LIMIT * 3
    wire.send(request("POST", "/v2/models/mlp/infer", headers={"Content-Type": "application/json",
                                                               "Content-Length": str(declared)}))
    # Answered as soon as the head is in, before any of the body is sent.
    refused = wire.read_response()
    assert refused.status == 413
    assert refused.headers["content-type"] == "application/json"
    assert refused.json() == {"error": f"request body of {declared} bytes is over the limit of {LIMIT} bytes"}
    assert "connection" not in refused.headers
    # The refused body still comes, and is skipped; the next request is answered.
    wire.send(b"{" * declared + infer(X2, "after-413"))
    assert_mlp_answer(wire.read_response(), X2, "after-413")
    assert not wire.buf


def test_it_refuses_a_chunked_body_growing_over_the_limit(wire: Wire) -> None:
    head = request("POST", "/v2/models/mlp/infer", headers={"Content-Type": "application/json",
                                                            "Transfer-Encoding": "chunked"})
    wire.send(head + chunked(b"[" * (LIMIT + 1000), 1024) + infer(X1, "after-chunked-413"))
    refused = wire.read_response()
    assert refused.status == 413
    assert refused.json() == {"error": f"request body is over the limit of {LIMIT} bytes"}
    assert "connection" not in refused.headers
    assert_mlp_answer(wire.read_response(), X1, "after-chunked-413")
    assert not wire.buf


@pytest.mark.parametrize("garbage", [b"NOT HTTP\r\n\r\n",
                                     b"GET /v2 HTTP/1.1\r\nHost: x\r\nno colon in this header line\r\n\r\n"])
def test_it_answers_a_malformed_request_with_400_and_closes(port: int, garbage: bytes) -> None:
    with Wire(port) as wire:
        wire.send(garbage)
        response = wire.read_response()
        assert response.status == 400
        assert response.headers["connection"] == "close"
        assert "malformed HTTP request" in response.json()["error"]
        wire.assert_closed()
    # The server carries on with new connections.
    with Wire(port) as wire:
        wire.send(request("GET", "/v2/health/live"))
        assert wire.read_response().status == 200


def test_it_answers_a_head_over_the_limit_with_431_and_closes(port: int) -> None:
    with Wire(port) as wire:
        wire.send(request("GET", "/v2/health/live", headers={"X-Big": "a" * (MAX_HEAD_BYTES + 6 * 1024)}))
        response = wire.read_response()
        assert response.status == 431
        assert response.headers["connection"] == "close"
        assert response.json() == {"error": f"request line and headers are over {MAX_HEAD_BYTES} bytes"}
        wire.assert_closed()
    with Wire(port) as wire:
        # Just under the limit is fine.
        wire.send(request("GET", "/v2/health/live", headers={"X-Big": "a" * (MAX_HEAD_BYTES - 1024)}))
        assert wire.read_response().status == 200


def test_it_answers_head_with_the_length_but_no_body(wire: Wire) -> None:
    wire.send(request("HEAD", "/v2") + request("GET", "/v2"))
    head = wire.read_response(head=True)
    assert head.status == 200
    assert head.headers["content-type"] == "application/json"
    length = int(head.headers["content-length"])
    assert length > 0
    # Had the head carried body bytes, this would not parse as a response.
    get = wire.read_response()
    assert get.status == 200
    assert len(get.body) == length
    assert get.json()["name"] == "edgewise-edge-runtime"
    assert not wire.buf


def test_it_closes_an_http_1_0_connection_after_the_answer(port: int) -> None:
    with Wire(port) as wire:
        wire.send(request("GET", "/v2", version="HTTP/1.0"))
        response = wire.read_response()
        assert response.status == 200
        assert response.headers["connection"] == "close"
        assert response.json()["name"] == "edgewise-edge-runtime"
        wire.assert_closed()


def test_it_closes_an_idle_keep_alive_connection() -> None:
    srv = om.ServerUnderTest(keep_alive_s=0.3)
    try:
        with Wire(srv.handle.port) as wire:
            wire.send(request("GET", "/v2/health/live"))
            assert wire.read_response().status == 200
            started = time.monotonic()
            wire.assert_closed()  # within the socket's 10 s timeout, or this raises
            assert time.monotonic() - started < TIMEOUT_S
        # A connection that never sends a request is closed too.
        with Wire(srv.handle.port) as wire:
            wire.assert_closed()
    finally:
        srv.close()


async def _begin(coro: Any) -> asyncio.Task[Any]:
    """Start ``coro`` as a task and let it run up to its first wait."""
    task = asyncio.ensure_future(coro)
    await asyncio.sleep(0)
    return task


async def _finish(task: asyncio.Task[Any]) -> Any:
    return await task


def test_it_answers_the_requests_in_flight_when_stopping(models: Path) -> None:
    srv = om.ServerUnderTest()
    try:
        # A lone request on this model waits for company for a minute: it is
        # in flight for certain until the batcher is told to run it.
        assert srv.load("mlp", "1", models / "mlp.onnx", max_queue_delay_ms=60_000).state == "serving"
        served = srv.registry.get("mlp")
        port = srv.handle.port
        with Wire(port) as wire:
            wire.send(infer(X1, "in-flight"))
            deadline = time.monotonic() + TIMEOUT_S
            while served.metrics.requests < 1:
                assert time.monotonic() < deadline, "the request never reached the model"
                time.sleep(0.01)
            stopping = srv.thread.run(_begin(srv.handle.stop()))
            # Stopping: no new connections, while the request in flight is still waiting.
            assert_refused_or_closed_without_answer(port)
            assert not stopping.done()
            assert wire.nothing_to_read()
            # The batcher runs what is queued when it closes: the request completes.
            srv.thread.run(srv.registry.unload("mlp"))
            answer = wire.read_response()
            assert_mlp_answer(answer, X1, "in-flight")
            # The answer says the connection ends with it.
            assert answer.headers["connection"] == "close"
            wire.assert_closed()
        srv.thread.run(_finish(stopping), timeout=TIMEOUT_S)
        assert_refused_or_closed_without_answer(port)
    finally:
        srv.close()


def test_it_answers_unknown_paths_and_wrong_methods_and_keeps_the_connection(wire: Wire) -> None:
    wire.send(request("GET", "/v2/nowhere/at-all"))
    missing = wire.read_response()
    assert missing.status == 404
    assert missing.reason == "Not Found"
    assert missing.json() == {"error": "no such endpoint: /v2/nowhere/at-all"}
    assert "connection" not in missing.headers
    wire.send(request("GET", "/v2/models/mlp/infer"))
    wrong = wire.read_response()
    assert wrong.status == 405
    assert wrong.json() == {"error": "method GET not allowed here (use POST)"}
    assert "connection" not in wrong.headers
    wire.send(infer(X2, "after-405"))
    assert_mlp_answer(wire.read_response(), X2, "after-405")


def test_a_slow_body_is_not_cut_off_by_the_idle_timeout(models: Path) -> None:
    srv = om.ServerUnderTest(keep_alive_s=0.3, max_body_bytes=LIMIT)
    try:
        assert srv.load("mlp", "1", models / "mlp.onnx").state == "serving"
        with Wire(srv.handle.port) as wire:
            # After an answered request, a second one whose body arrives slowly.
            second = infer(X2, "slow")
            head_end = second.index(b"\r\n\r\n") + 4
            wire.send(infer(X1, "first") + second[:head_end + 10])
            assert_mlp_answer(wire.read_response(), X1, "first")
            time.sleep(1.0)
            wire.send(second[head_end + 10:])
            assert_mlp_answer(wire.read_response(), X2, "slow")
            # The body of a request refused for its size may arrive slowly too.
            wire.send(request("POST", "/v2/models/mlp/infer", headers={"Content-Length": str(LIMIT + 1)}))
            assert wire.read_response().status == 413
            time.sleep(1.0)
            wire.send(b"x" * (LIMIT + 1) + infer(X1, "after"))
            assert_mlp_answer(wire.read_response(), X1, "after")
    finally:
        srv.close()


def test_an_expect_continue_request_over_the_limit_gets_413_and_the_connection_closes(wire: Wire) -> None:
    wire.send(request("POST", "/v2/models/mlp/infer",
                      headers={"Content-Length": str(LIMIT + 1), "Expect": "100-continue"}))
    refused = wire.read_response()
    assert refused.status == 413
    # The client will not send the body it asked about: the connection cannot carry on.
    assert refused.headers["connection"] == "close"
    wire.assert_closed()


def test_100_continue_waits_its_turn_behind_earlier_answers(wire: Wire) -> None:
    body = mlp_body(X2, "second")
    wire.send(infer(X1, "first") + request("POST", "/v2/models/mlp/infer", headers={
        "Content-Length": str(len(body)), "Expect": "100-continue", "Content-Type": "application/json"}))
    assert_mlp_answer(wire.read_response(), X1, "first")
    assert wire.read_until(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    wire.send(body)
    assert_mlp_answer(wire.read_response(), X2, "second")


# Slow and stalled clients, and the connection cap -------------------------------------

SLOW_CLIENTS = 200


def read_answer_or_end(wire: Wire) -> Response | None:
    """The one answer the server sends before it closes the connection, or None if it just closed it."""
    try:
        if not wire.sock.recv(1, socket.MSG_PEEK):
            return None
    except ConnectionResetError:
        return None
    return wire.read_response()


def live_status(port: int) -> int | None:
    """The status of ``GET /v2/health/live`` on a new connection; None if it was reset (refused over the cap
    while the request was on its way)."""
    with Wire(port) as wire:
        try:
            wire.send(request("GET", "/v2/health/live"))
            return wire.read_response().status
        except (BrokenPipeError, ConnectionResetError):
            return None


def timeout_lines(caplog: pytest.LogCaptureFixture, what: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "edge_runtime.serving" and what in r.getMessage()]


def test_it_closes_many_slowloris_connections_after_the_header_timeout_and_serves_others_meanwhile(
        models: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_runtime.serving")
    header_timeout = 2.0
    srv = om.ServerUnderTest(header_timeout_s=header_timeout)
    slow: list[Wire] = []
    try:
        assert srv.load("mlp", "1", models / "mlp.onnx").state == "serving"
        started = time.monotonic()
        for i in range(SLOW_CLIENTS):
            wire = Wire(srv.handle.port)
            slow.append(wire)
            # Half a head, the rest in a trickle: each byte is progress, but the head's clock is a total.
            wire.send(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: %d" % i)
        time.sleep(header_timeout / 4)
        for wire in slow[:20]:
            wire.send(b"0")
        # Meanwhile another client is served at once, on a new connection.
        with Wire(srv.handle.port) as normal:
            normal.send(infer(X1, "meanwhile"))
            assert_mlp_answer(normal.read_response(), X1, "meanwhile")
        assert all(w.nothing_to_read() for w in slow), "a slow head was cut off before its timeout"
        # (Only true if checked before the timeout: on a machine too slow for that, this says so.)
        assert time.monotonic() - started < header_timeout, "opening the connections took longer than the timeout"
        for wire in slow:
            answer = read_answer_or_end(wire)
            assert answer is not None and answer.status == 408, answer
            assert answer.headers["connection"] == "close"
            assert answer.json() == {"error": f"the request line and headers were not complete within "
                                              f"{header_timeout:g} s"}
            wire.assert_closed()
        # The header timeout plus the sweep's slack (half of it), and a second for a loaded machine.
        assert time.monotonic() - started < header_timeout * 1.5 + 1.0
    finally:
        for wire in slow:
            wire.sock.close()
        srv.close()
    # A line or two for all of them (what is left is said when the server stops), not one for each.
    lines = timeout_lines(caplog, "the header timeout")
    assert 1 <= len(lines) <= 2, lines
    assert sum(int(line.split()[1]) for line in lines) == SLOW_CLIENTS


def test_it_answers_a_stalled_body_408_after_the_body_timeout(models: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_runtime.serving")
    body_timeout = 0.8
    srv = om.ServerUnderTest(body_timeout_s=body_timeout)
    try:
        assert srv.load("mlp", "1", models / "mlp.onnx").state == "serving"
        with Wire(srv.handle.port) as wire:
            # An answered request first: the stall is in the second one's body.
            body = mlp_body(X1, "stalled")
            wire.send(infer(X2, "first") + request("POST", "/v2/models/mlp/infer", headers={
                "Content-Type": "application/json", "Content-Length": str(len(body))}) + body[:10])
            assert_mlp_answer(wire.read_response(), X2, "first")
            stalled_at = time.monotonic()
            answer = wire.read_response()
            waited = time.monotonic() - stalled_at
            assert answer.status == 408
            assert answer.headers["connection"] == "close"
            assert answer.json() == {"error": f"no part of the request body came for {body_timeout:g} s"}
            wire.assert_closed()
            assert body_timeout * 0.9 < waited < body_timeout * 1.5 + 1.0
        [line] = timeout_lines(caplog, "the body timeout")
        assert line.startswith("closed 1 connection(s) whose request body stalled for 0.8 s")
        # A chunked body that stalls after its first chunk, in the next one's size line, is cut off the same way.
        with Wire(srv.handle.port) as wire:
            wire.send(request("POST", "/v2/models/mlp/infer", headers={"Transfer-Encoding": "chunked"})
                      + b"4\r\n[1.0\r\n1")
            assert read_answer_or_end(wire).status == 408  # type: ignore[union-attr]
            wire.assert_closed()
    finally:
        srv.close()


def test_it_does_not_cut_a_slow_upload_that_keeps_coming(models: Path) -> None:
    body_timeout = 1.0
    srv = om.ServerUnderTest(body_timeout_s=body_timeout, header_timeout_s=body_timeout)
    try:
        assert srv.load("mlp", "1", models / "mlp.onnx").state == "serving"
        with Wire(srv.handle.port) as wire:
            body = mlp_body(X1, "slow-but-steady")
            wire.send(request("POST", "/v2/models/mlp/infer", headers={
                "Content-Type": "application/json", "Content-Length": str(len(body))}))
            started = time.monotonic()
            pieces = 12
            step = -(-len(body) // pieces)
            for i in range(0, len(body), step):
                wire.send(body[i:i + step])
                time.sleep(body_timeout / 4)
            # Three times the body timeout in all, yet never a stall as long as it.
            assert time.monotonic() - started > 2.5 * body_timeout
            assert_mlp_answer(wire.read_response(), X1, "slow-but-steady")
            wire.send(request("GET", "/v2/health/live"))
            assert wire.read_response().status == 200
    finally:
        srv.close()


def test_it_refuses_connections_over_the_cap_and_accepts_again_once_one_closes(
        models: Path, caplog: pytest.LogCaptureFixture) -> None:
    cap = 3
    srv = om.ServerUnderTest(max_connections=cap)
    held: list[Wire] = []
    try:
        for _ in range(cap):
            wire = Wire(srv.handle.port)
            held.append(wire)
            wire.send(request("GET", "/v2/health/live"))
            assert wire.read_response().status == 200
        for attempt in range(3):
            with Wire(srv.handle.port) as refused:
                answer = read_answer_or_end(refused)
                assert answer is not None and answer.status == 503, (attempt, answer)
                assert answer.headers["connection"] == "close"
                assert answer.headers["retry-after"] == "1"
                assert answer.json() == {"error": f"this server already holds {cap} connections, its limit"}
                refused.assert_closed()
        # One line for the three refusals, naming the cap and how to raise it.
        [line] = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert line == (f"refused 1 connection(s): this serving process already holds {cap} connections, its "
                        f"limit; raise it with edge-runtime's --max-connections (EDGEWISE_SERVE_MAX_CONNECTIONS) "
                        f"if these clients are legitimate")
        assert [r.levelno for r in caplog.records if "refused" in r.getMessage()] == [logging.WARNING]
        # The held connections still work; once a client goes, its place is free.
        held[0].send(request("GET", "/v2/health/ready"))
        assert held[0].read_response().status == 200
        held.pop(0).sock.close()
        deadline = time.monotonic() + TIMEOUT_S
        while (status := live_status(srv.handle.port)) != 200:
            assert status in (503, None), status
            assert time.monotonic() < deadline, "the closed connection's place never came free"
            time.sleep(0.05)
    finally:
        for wire in held:
            wire.sock.close()
        srv.close()


def test_it_refuses_a_limit_that_is_not_one() -> None:
    from edge_runtime.serving import ModelRegistry, ServerError, run_server

    async def start(**limits: Any) -> None:
        await run_server(ModelRegistry(), "127.0.0.1", 0, **limits)

    with pytest.raises(ServerError, match="header_timeout_s must be a positive number of seconds, not 0"):
        asyncio.run(start(header_timeout_s=0))
    with pytest.raises(ServerError, match="max_connections must be at least 1, not 0"):
        asyncio.run(start(max_connections=0))


def test_it_cuts_off_a_client_that_reads_none_of_its_answers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_runtime.serving")
    body_timeout = 1.0
    srv = om.ServerUnderTest(body_timeout_s=body_timeout)
    try:
        sock = socket.socket()
        # A small receive buffer, so that the answers back up into the server's own buffer.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", srv.handle.port))
        sock.setblocking(False)
        requests = request("GET", "/v2") * 200_000
        sent = 0
        # Pipelined requests, never a byte read back, until the server stops taking them (it stops reading).
        stalled_since = time.monotonic()
        while time.monotonic() - stalled_since < 0.5:
            try:
                n = sock.send(requests[sent:sent + 65536])
            except BlockingIOError:
                time.sleep(0.01)
                continue
            sent += n
            stalled_since = time.monotonic()
        assert sent < len(requests), "the server read everything: its answers never backed up"
        # Still reading nothing, past the body timeout and the sweep's slack.
        time.sleep(body_timeout * 1.5 + 0.5)
        deadline = time.monotonic() + 5.0
        # Now read: what the server had sent, then the end, because it cut the connection off.
        sock.setblocking(True)
        sock.settimeout(1.0)
        while True:
            assert time.monotonic() < deadline, "the connection was still open long after the body timeout"
            try:
                data = sock.recv(1 << 20)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            if not data:
                break
        sock.close()
        assert timeout_lines(caplog, "read nothing of its answers") == [
            f"closed 1 connection(s) whose client read nothing of its answers for {body_timeout:g} s "
            f"(the body timeout)"]
    finally:
        srv.close()
