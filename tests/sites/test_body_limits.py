"""Request body limits and the body read timeout (orchestrator.asgi_limits), against a real uvicorn control plane.

The control plane here is a process of its own, with a body timeout of one
second (``EDGEWISE_BODY_TIMEOUT_S``), and the requests are raw bytes over a
socket, so that a body that never comes, or comes in chunks, is exactly what
the server sees.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from django.conf import settings

from audit.models import AuditEvent
from audit.services import Actor
from edge_runtime import protocol
from orchestrator.asgi_limits import DEFAULT_MAX_BODY_BYTES, MULTIPART_ALLOWANCE_BYTES, body_limit
from sites import services
from sites.models import EnrollmentToken, Node, Site
from tests.fixtures.processes import ControlPlane, control_plane_env, free_port

pytestmark = pytest.mark.process

BODY_TIMEOUT_S = 1.0
SOCKET_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def plane(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    log = tmp_path_factory.mktemp("body-limits") / "uvicorn.log"
    cp = ControlPlane(port=free_port(), log=log, env=control_plane_env(EDGEWISE_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S)))
    cp.start()
    yield cp
    cp.stop()


@pytest.fixture
def live(plane: ControlPlane, transactional_db: None) -> ControlPlane:
    return plane


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    # Whether the server closed the connection after the answer.
    closed: bool

    def json(self) -> Any:
        return json.loads(self.body)


def connect(plane: ControlPlane) -> socket.socket:
    return socket.create_connection(("127.0.0.1", plane.port), timeout=SOCKET_TIMEOUT_S)


def head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_answer(sock: socket.socket) -> Answer:
    """One answer (by its content-length), then whether the connection ends there."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before an answer (have {data[:200]!r})"
        data += chunk
    raw_head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = raw_head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed in the middle of the answer"
        rest += chunk
    try:
        closed = rest[length:] == b"" and sock.recv(65536) == b""
    except ConnectionResetError:
        closed = True
    return Answer(int(status_line.split()[1]), headers, rest[:length], closed)


def chunked(body: bytes, size: int) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def enroll_body(token: str, name: str = "gw-1") -> bytes:
    return json.dumps({"token": token, "name": name, "role": "gateway",
                       "hardware": {"cpu_cores": 2, "memory_mb": 2048}}).encode()


@pytest.fixture
def token(site_berlin: Site) -> str:
    return services.token_create(actor=Actor.system("test"), site=site_berlin)[1]


def assert_nothing_enrolled() -> None:
    assert not Node.objects.exists()
    assert list(EnrollmentToken.objects.values_list("uses", flat=True)) == [0]
    assert not AuditEvent.objects.filter(action="node.enroll").exists()


# The limits by path --------------------------------------------------------------------

def test_it_takes_each_paths_limit_from_the_view_that_reads_it() -> None:
    assert body_limit("/agent/v1/enroll") == protocol.MAX_AGENT_BODY_BYTES
    assert body_limit("/agent/v1/nodes/3f2c5a8e-0000-4000-8000-000000000000/sync") == protocol.MAX_AGENT_BODY_BYTES
    assert body_limit("/agent/v1/no/such/endpoint") == protocol.MAX_AGENT_BODY_BYTES
    assert body_limit("/agent/v1/nodes/3f2c5a8e-0000-4000-8000-000000000000/queries/q-1/result") \
        == protocol.MAX_QUERY_RESULT_BYTES
    model_limit = settings.MAX_MODEL_BYTES + MULTIPART_ALLOWANCE_BYTES
    assert body_limit("/models/resnet/versions") == model_limit
    assert body_limit("/admin/models_registry/modelversion/add/") == model_limit
    assert body_limit("/login/") == DEFAULT_MAX_BODY_BYTES
    assert body_limit("/nowhere") == DEFAULT_MAX_BODY_BYTES


# Against the running control plane --------------------------------------------------------

def test_it_refuses_an_enroll_declaring_a_huge_body_at_once(live: ControlPlane, token: str) -> None:
    with connect(live) as sock:
        started = time.monotonic()
        sock.sendall(head("POST", "/agent/v1/enroll", {"Content-Type": "application/json",
                                                       "Content-Length": "10000000000"}))
        answer = read_answer(sock)
        assert time.monotonic() - started < 0.5
    assert answer.status == 413
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == {"error": f"request body of 10000000000 bytes exceeds the limit of "
                                      f"{protocol.MAX_AGENT_BODY_BYTES} bytes for /agent/v1/enroll", "field": None}
    assert answer.closed
    assert_nothing_enrolled()


def test_it_answers_408_to_a_stalled_enroll_and_serves_others_meanwhile(live: ControlPlane, token: str) -> None:
    body = enroll_body(token)
    with connect(live) as sock:
        sock.sendall(head("POST", "/agent/v1/enroll", {"Content-Type": "application/json",
                                                       "Content-Length": str(len(body))}) + body[:20])
        stalled_at = time.monotonic()
        # Meanwhile, another client is answered at once.
        assert httpx.get(f"{live.url}/agent/v1/health", timeout=5).status_code == 200
        assert time.monotonic() - stalled_at < BODY_TIMEOUT_S
        answer = read_answer(sock)
        waited = time.monotonic() - stalled_at
    assert answer.status == 408
    assert answer.json() == {"error": f"no part of the request body came for {BODY_TIMEOUT_S:g} s", "field": None}
    assert answer.closed
    assert BODY_TIMEOUT_S * 0.9 < waited < BODY_TIMEOUT_S + 2.0
    assert_nothing_enrolled()


def test_it_answers_408_to_a_stalled_chunked_body(live: ControlPlane, token: str) -> None:
    body = chunked(enroll_body(token), 16)
    with connect(live) as sock:
        sock.sendall(head("POST", "/agent/v1/enroll", {"Content-Type": "application/json",
                                                       "Transfer-Encoding": "chunked"}) + body[:40])
        answer = read_answer(sock)
    assert answer.status == 408
    assert answer.closed
    assert_nothing_enrolled()


def test_it_cuts_a_chunked_body_that_grows_over_the_limit_with_413(live: ControlPlane, token: str) -> None:
    # Valid JSON all along, so that only its size is wrong.
    padding = b" " * (protocol.MAX_AGENT_BODY_BYTES + 1)
    with connect(live) as sock:
        sock.sendall(head("POST", "/agent/v1/enroll", {"Content-Type": "application/json",
                                                       "Transfer-Encoding": "chunked"}))
        try:
            sock.sendall(chunked(padding + enroll_body(token), 16 * 1024))
        except (BrokenPipeError, ConnectionResetError):
            pass  # cut off while sending: the answer is already on its way
        answer = read_answer(sock)
    assert answer.status == 413
    assert answer.json() == {"error": f"request body exceeds the limit of {protocol.MAX_AGENT_BODY_BYTES} bytes "
                                      f"for /agent/v1/enroll", "field": None}
    assert answer.closed
    assert_nothing_enrolled()


def test_it_still_enrolls_a_node_by_length_or_in_chunks(live: ControlPlane, site_berlin: Site) -> None:
    by_length = services.token_create(actor=Actor.system("test"), site=site_berlin)[1]
    response = httpx.post(f"{live.url}/agent/v1/enroll", content=enroll_body(by_length, "gw-1"),
                          headers={"Content-Type": "application/json"}, timeout=10)
    assert response.status_code == 201, response.text
    in_chunks = services.token_create(actor=Actor.system("test"), site=site_berlin)[1]
    with connect(live) as sock:
        sock.sendall(head("POST", "/agent/v1/enroll", {"Content-Type": "application/json",
                                                       "Transfer-Encoding": "chunked"})
                     + chunked(enroll_body(in_chunks, "gw-2"), 8))
        answer = read_answer(sock)
    assert answer.status == 201, answer.body
    assert sorted(Node.objects.values_list("name", flat=True)) == ["gw-1", "gw-2"]


def test_it_lets_the_query_result_endpoint_take_more_than_other_agent_endpoints(live: ControlPlane) -> None:
    path = "/agent/v1/nodes/3f2c5a8e-0000-4000-8000-000000000000/queries/q-1/result"
    over_agent_limit = b" " * (protocol.MAX_AGENT_BODY_BYTES * 2)
    response = httpx.post(f"{live.url}{path}", content=over_agent_limit,
                          headers={"Content-Type": "application/json"}, timeout=10)
    # Through to the view, which wants a credential first.
    assert response.status_code == 401
    with connect(live) as sock:
        declared = protocol.MAX_QUERY_RESULT_BYTES + 1
        sock.sendall(head("POST", path, {"Content-Type": "application/json", "Content-Length": str(declared)}))
        answer = read_answer(sock)
    assert answer.status == 413
    assert answer.json()["error"] == (f"request body of {declared} bytes exceeds the limit of "
                                      f"{protocol.MAX_QUERY_RESULT_BYTES} bytes for {path}")


def test_it_refuses_a_console_request_over_its_limit_in_plain_text(live: ControlPlane) -> None:
    declared = settings.MAX_MODEL_BYTES + MULTIPART_ALLOWANCE_BYTES + 1
    for path, limit in (("/models/resnet/versions", declared - 1), ("/login/", DEFAULT_MAX_BODY_BYTES)):
        with connect(live) as sock:
            sock.sendall(head("POST", path, {"Content-Type": "multipart/form-data; boundary=x",
                                             "Content-Length": str(declared)}))
            answer = read_answer(sock)
        assert answer.status == 413, path
        assert answer.headers["content-type"] == "text/plain; charset=utf-8"
        assert answer.body.decode() == f"request body of {declared} bytes exceeds the limit of {limit} bytes for {path}"
        assert answer.closed
    # A body over the default limit is no trouble on the upload path: it reaches Django, whose CSRF check
    # (before the view's log-in) refuses this one, sent without a token.
    response = httpx.post(f"{live.url}/models/resnet/versions", content=b"x" * (DEFAULT_MAX_BODY_BYTES + 1),
                          headers={"Content-Type": "application/octet-stream"}, timeout=30)
    assert response.status_code == 403
    assert "CSRF" in response.text
