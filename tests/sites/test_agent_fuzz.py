"""Hostile input to the agent API: whatever a node sends, the answer is a 4xx naming the field, never a 5xx.

A property-based test posts sync and enrollment bodies built from valid
structure mixed with hostile values (recursive JSON, integers past int64,
strings past their columns, NUL, unpaired surrogates, NaN, wrong types at every
field) against a real enrolled node on PostgreSQL; explicit regressions pin each
kind of input that once reached the database or the parser unchecked.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Any

import httpx
import pytest
import websockets
from django.test import Client
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from audit.models import AuditEvent
from audit.services import Actor
from queries.models import QuerySite
from sites import services
from sites.models import Node, Site, TelemetryStream
from tests.fixtures.processes import ControlPlane
from tests.queries.conftest import Estate, estate  # noqa: F401 - the query estate fixture
from tests.queries.helpers import create

pytestmark = pytest.mark.django_db

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])

# Values that once reached a column, the parser or a later JSON encoder unchecked.
HOSTILE: list[Any] = [2**63, 2**31, -(2**63) - 1, 10**30, float("nan"), float("inf"), -float("inf"), 1e308,
                      "\x00", "a\x00b", "\ud800", "x" * 5000, "", [], {}, [[[[[]]]]], {"a": {"b": {"c": None}}},
                      True, None, 1.5, -1, "not-a-date", "1", 0]

json_leaf = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
             | st.sampled_from(HOSTILE))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=12)


def valid_sync() -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC).isoformat()
    return {
        "runtime_version": "0.1.0",
        "hardware": {"cpu_model": "x", "cpu_cores": 4, "memory_mb": 8192, "accelerators": [],
                     "execution_providers": ["CPUExecutionProvider"], "os": "linux", "arch": "x86_64",
                     "hostname": "gw-1"},
        "actual": {
            "applied_generation": 1,
            "models": [{"name": "resnet", "version": "1", "sha256": "", "variant": "original", "state": "failed",
                        "error": "boom", "stats": {"requests": 3, "errors": 1, "latency_bounds": [0.1, 1.0],
                                                   "latency_counts": [1, 1, 1], "latency_sum_s": 0.5}}],
            "detail": {"datasets": {"datasets": [{"name": "readings", "kind": "csv", "row_count": 3,
                                                  "columns": [{"name": "line", "type": "string"}]}],
                                    "errors": {"gone": "does not exist"}, "policy": {"version": 0}},
                       "models": {"models": []}},
        },
        "health": {"status": "ok", "uptime_s": 12.0, "failed_syncs": 0, "message": ""},
        "refusals": [{"generation": 3, "reason": "signature", "at": now}],
    }


def _paths(value: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _paths(item, (*path, i))
    return found


SYNC_PATHS = _paths(valid_sync())[1:]


def _replaced(body: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    copy = json.loads(json.dumps(body))
    target = copy
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return copy


def _like(value: Any) -> st.SearchStrategy[Any]:
    """Values of the same JSON type as ``value``: what passes a type check and tests the bounds behind it."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers() | st.sampled_from([2**31 - 1, 2**31, 2**63 - 1, 2**63, -1])
    if isinstance(value, float):
        return st.floats()
    if isinstance(value, str):
        return st.text(max_size=8) | st.text(min_size=40, max_size=120) | st.sampled_from(["\x00", "\ud800"])
    return json_value


@st.composite
def hostile_sync(draw: st.DrawFn) -> dict[str, Any]:
    """A valid sync with one to three fields (anywhere in it) replaced by a value of the same type (often
    out of bounds) or by hostile or random JSON."""
    body = valid_sync()
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(SYNC_PATHS))
        try:
            original = body
            for part in path:
                original = original[part]
            body = _replaced(body, path, draw(_like(original) if draw(st.booleans()) else json_value))
        except (KeyError, IndexError, TypeError):
            continue  # an earlier replacement removed this path
    if draw(st.booleans()):
        body[draw(st.text(max_size=8))] = draw(json_value)
    return body


def _encode(body: Any) -> bytes:
    return json.dumps(body, allow_nan=True).encode()


def assert_no_5xx_and_names_the_field(response: Any) -> None:
    event(f"status {response.status_code}")
    assert response.status_code < 500, response.content[:500]
    if response.status_code == 400:
        answer = response.json()
        assert isinstance(answer.get("field"), str) and answer["field"], answer
        assert answer["error"]


@pytest.fixture
def node(client: Client, site_berlin: Site) -> dict[str, Any]:
    token = services.token_create(actor=Actor.system("test"), site=site_berlin)[1]
    response = client.post("/agent/v1/enroll", json.dumps({"token": token, "name": "gw-1"}),
                           content_type="application/json")
    assert response.status_code == 201, response.content
    return dict(response.json())


def post_sync(client: Client, node: dict[str, Any], body: bytes) -> Any:
    return client.post(f"/agent/v1/nodes/{node['node_id']}/sync", body, content_type="application/json",
                       headers={"Authorization": f"Bearer {node['credential']}"})


@FUZZ
@given(body=hostile_sync())
def test_it_never_answers_a_fuzzed_sync_with_a_server_error(client: Client, node: dict[str, Any],
                                                           body: dict[str, Any]) -> None:
    assert_no_5xx_and_names_the_field(post_sync(client, node, _encode(body)))


@FUZZ
@given(body=json_value)
def test_it_never_answers_random_json_with_a_server_error(client: Client, node: dict[str, Any], body: Any) -> None:
    assert_no_5xx_and_names_the_field(post_sync(client, node, _encode(body)))


@FUZZ
@given(replacements=st.dictionaries(st.sampled_from(["token", "name", "role", "runtime_version", "hardware",
                                                     "protocol", "cpu_cores", "memory_mb", "cpu_model",
                                                     "accelerators"]), json_value, min_size=1, max_size=3))
def test_it_never_answers_a_fuzzed_enrollment_with_a_server_error(client: Client, site_berlin: Site,
                                                                 replacements: dict[str, Any]) -> None:
    token = services.token_create(actor=Actor.system("test"), site=site_berlin, max_uses=1)[1]
    body: dict[str, Any] = {"token": token, "name": "gw-9", "role": "device", "hardware": {"cpu_cores": 2}}
    for key, value in replacements.items():
        if key in ("cpu_cores", "memory_mb", "cpu_model", "accelerators"):
            body["hardware"] = {**body["hardware"], key: value} if isinstance(body["hardware"], dict) else value
        else:
            body[key] = value
    response = client.post("/agent/v1/enroll", _encode(body), content_type="application/json")
    assert_no_5xx_and_names_the_field(response)


def _deep(depth: int, inner: str = "0") -> str:
    return "[" * depth + inner + "]" * depth


def _sync_with(path: tuple[str | int, ...], value: Any) -> bytes:
    return _encode(_replaced(valid_sync(), path, value))


REGRESSIONS: list[tuple[str, bytes, str]] = [
    ("generation-past-int64", _sync_with(("actual", "applied_generation"), 2**63), "actual.applied_generation"),
    ("generation-past-the-integer-column", _sync_with(("actual", "applied_generation"), 2**31),
     "actual.applied_generation"),
    ("model-name-past-its-column", _sync_with(("actual", "models", 0, "name"), "m" * 101), "actual.models.0.name"),
    ("model-version-past-its-column", _sync_with(("actual", "models", 0, "version"), "1" * 51),
     "actual.models.0.version"),
    ("stats-requests-past-int64", _sync_with(("actual", "models", 0, "stats", "requests"), 2**63),
     "actual.models.0.stats.requests"),
    ("datasets-as-a-string", _sync_with(("actual", "detail", "datasets"), "readings"), "actual.detail.datasets"),
    ("datasets-list-as-a-number", _sync_with(("actual", "detail", "datasets", "datasets"), 5),
     "actual.detail.datasets.datasets"),
    ("dataset-errors-as-a-list", _sync_with(("actual", "detail", "datasets", "errors"), ["gone"]),
     "actual.detail.datasets.errors"),
    ("dataset-error-not-text", _sync_with(("actual", "detail", "datasets", "errors"), {"gone": {"why": 1}}),
     "actual.detail.datasets.errors.gone"),
    ("dataset-name-past-its-column",
     _sync_with(("actual", "detail", "datasets", "datasets", 0, "name"), "d" * 65),
     "actual.detail.datasets.datasets.0.name"),
    ("dataset-row-count-past-int64",
     _sync_with(("actual", "detail", "datasets", "datasets", 0, "row_count"), 2**63),
     "actual.detail.datasets.datasets.0.row_count"),
    ("refusal-generation-past-int64", _sync_with(("refusals", 0, "generation"), 2**64), "refusals.0.generation"),
    ("nul-in-a-stored-string", _sync_with(("health", "message"), "ok\x00"), "health.message"),
    ("nul-in-free-form-detail", _sync_with(("actual", "detail", "models"), {"note": "a\x00"}),
     "actual.detail.models.note"),
    ("nul-in-a-key", _sync_with(("actual", "detail", "models"), {"a\x00": 1}), "actual.detail.models"),
    ("unpaired-surrogate", _sync_with(("hardware", "cpu_model"), "\udc00"), "hardware.cpu_model"),
    ("nan", _sync_with(("health", "uptime_s"), float("nan")), "health.uptime_s"),
    ("infinity-in-free-form-detail", _sync_with(("actual", "detail", "models"), {"t": float("inf")}),
     "actual.detail.models.t"),
    ("float-overflowing-to-infinity", _sync_with(("health", "uptime_s"), 1).replace(b'"uptime_s": 1',
                                                                                    b'"uptime_s": 1e999'),
     "health.uptime_s"),
    ("integer-of-5000-digits", _sync_with(("actual", "detail", "models"), {"n": 1}).replace(b'"n": 1',
                                                                                            b'"n": ' + b"9" * 5000),
     "actual.detail.models.n"),
    ("integer-past-int64-in-free-form-detail", _sync_with(("actual", "detail", "models"), {"n": 2**64}),
     "actual.detail.models.n"),
    ("nesting-100k-deep", _deep(100_000).encode(), "body"),
    ("nesting-100k-deep-inside-detail",
     _sync_with(("actual", "detail", "models"), 0).replace(b'"models": 0', b'"models": ' + _deep(100_000).encode()),
     "body"),
    ("nesting-past-the-limit-inside-detail",
     _sync_with(("actual", "detail", "models"), 0).replace(b'"models": 0', b'"models": ' + _deep(40).encode()),
     "actual.detail.models" + ".0" * 29),
    ("not-utf-8", b'{"health": {"message": "\xff\xfe"}}', "body"),
    ("utf-16", '{"health": {}}'.encode("utf-16"), "body"),
    ("top-level-array", b"[]", "body"),
    ("top-level-string", b'"sync"', "body"),
    ("model-list-as-an-object", _sync_with(("actual", "models"), {"name": "x"}), "actual.models"),
]


@pytest.mark.parametrize(("body", "field"), [(b, f) for _, b, f in REGRESSIONS], ids=[i for i, _, _ in REGRESSIONS])
def test_it_refuses_hostile_sync_input_naming_the_field_and_writes_nothing(
    client: Client, node: dict[str, Any], body: bytes, field: str
) -> None:
    events = AuditEvent.objects.count()
    response = post_sync(client, node, body)
    assert response.status_code == 400, response.content[:300]
    assert response.json()["field"] == field, response.json()
    stored = Node.objects.get(uuid=node["node_id"])
    assert stored.last_seen_at is None and stored.applied_generation == 0
    assert AuditEvent.objects.count() == events


def test_it_still_accepts_the_valid_sync_the_fuzzing_starts_from(client: Client, node: dict[str, Any]) -> None:
    response = post_sync(client, node, _encode(valid_sync()))
    assert response.status_code == 200, response.content
    stored = Node.objects.get(uuid=node["node_id"])
    assert stored.applied_generation == 1 and stored.actual_state["detail"]["datasets"]["errors"] == {
        "gone": "does not exist"}


@pytest.mark.parametrize(
    ("extra", "field"),
    [({"name": "n" * 101}, "name"), ({"runtime_version": "v" * 51}, "runtime_version"),
     ({"hardware": {"memory_mb": 2**63}}, "hardware.memory_mb"), ({"hardware": {"os": "linux\x00"}}, "hardware.os"),
     ({"token": "ewt_\ud800\ud800\ud800\ud800"}, "token")],
    ids=["name", "runtime-version", "memory", "nul", "surrogate-token"],
)
def test_it_refuses_a_hostile_enrollment_naming_the_field(client: Client, site_berlin: Site, extra: dict[str, Any],
                                                          field: str) -> None:
    token = services.token_create(actor=Actor.system("test"), site=site_berlin)[1]
    body = {"token": token, "name": "gw-1", **extra}
    response = client.post("/agent/v1/enroll", _encode(body), content_type="application/json")
    assert response.status_code == 400, response.content
    assert response.json()["field"] == field
    assert not Node.objects.exists()


# -- query answers ----------------------------------------------------------------------------------------------


def _answer_body(query_id: str, **fields: Any) -> dict[str, Any]:
    return {"query_id": query_id, "site": "plant-berlin", "status": "refused", "reason": "no", **fields}


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"reason": "no\x00"}, "reason"), ({"rule": "r\x00"}, "rule"),
     ({"suppressed": {"cells": 2**31}}, "suppressed.cells"), ({"rows_scanned": 2**63}, "rows_scanned"),
     ({"audit_seq": 2**63}, "audit_seq")],
    ids=["nul-reason", "nul-rule", "cells-past-integer", "rows-scanned-past-int64", "audit-seq-past-int64"],
)
def test_it_refuses_a_hostile_query_answer_naming_the_field(client: Client, estate: Estate, admin_user: Any,  # noqa: F811
                                                            fields: dict[str, Any], field: str) -> None:
    query = create(admin_user, [estate.berlin])
    body = json.dumps(_answer_body(str(query.uuid), **fields))
    response = client.post(f"/agent/v1/nodes/{estate.berlin_node.uuid}/queries/{query.uuid}/result", body,
                           content_type="application/json",
                           headers={"Authorization": f"Bearer {estate.berlin_credential}"})
    assert response.status_code == 400, response.content
    assert response.json()["field"] == field
    assert QuerySite.objects.get(query=query).answered_at is None


@pytest.mark.parametrize(
    "raw",
    [b'{"status": "answered", "elapsed_ms": Infinity}', b'{"status": "answered", "elapsed_ms": NaN}',
     b'{"status": "answered", "elapsed_ms": 1e999}', _deep(100_000).encode(), b"\xff\xfe",
     b'{"status": "answered", "reason": "\\ud800"}'],
    ids=["infinity", "nan", "overflow", "deep", "not-utf-8", "surrogate"],
)
def test_it_refuses_an_unreadable_query_answer_as_a_bad_request(client: Client, estate: Estate,  # noqa: F811
                                                                admin_user: Any, raw: bytes) -> None:
    query = create(admin_user, [estate.berlin])
    response = client.post(f"/agent/v1/nodes/{estate.berlin_node.uuid}/queries/{query.uuid}/result", raw,
                           content_type="application/json",
                           headers={"Authorization": f"Bearer {estate.berlin_credential}"})
    assert response.status_code == 400, response.content
    assert response.json()["field"]


def test_it_refuses_an_answer_whose_values_cannot_be_merged(client: Client, estate: Estate,  # noqa: F811
                                                            admin_user: Any) -> None:
    query = create(admin_user, [estate.berlin])
    from tests.queries.test_agent_endpoint import _answer

    good = json.loads(_answer(estate, query).model_dump_json())
    assert good["status"] == "answered" and good["partials"]["rows"]
    broken = json.loads(json.dumps(good))
    broken["partials"]["aggregates"][0]["n"] = [2**70] * len(good["partials"]["rows"])
    response = client.post(f"/agent/v1/nodes/{estate.berlin_node.uuid}/queries/{query.uuid}/result",
                           json.dumps(broken), content_type="application/json",
                           headers={"Authorization": f"Bearer {estate.berlin_credential}"})
    assert response.status_code == 400, response.content
    assert response.json()["field"] == "partials"
    ok = client.post(f"/agent/v1/nodes/{estate.berlin_node.uuid}/queries/{query.uuid}/result", json.dumps(good),
                     content_type="application/json", headers={"Authorization": f"Bearer {estate.berlin_credential}"})
    assert ok.status_code == 201, ok.content
    query.refresh_from_db()
    assert query.state == "complete"


# -- telemetry over the stream ----------------------------------------------------------------------------------


def _point(**changes: Any) -> dict[str, Any]:
    point: dict[str, Any] = {"kind": "point", "seq": 1, "at": dt.datetime.now(dt.UTC).isoformat(), "interval_s": 1.0,
                             "resources": {"cpu_percent": 5.0},
                             "models": [{"model": "resnet", "version": "1", "requests": 1}]}
    for path, value in changes.items():
        target = point
        parts = path.split("__")
        for part in parts[:-1]:
            target = target[int(part)] if isinstance(target, list) else target[part]
        target[parts[-1]] = value
    return point


HOSTILE_FRAMES: list[tuple[str, str | bytes]] = [
    ("seq-past-int64", json.dumps({"type": "telemetry", "items": [_point(seq=2**63)]})),
    ("nul-in-model", json.dumps({"type": "telemetry", "items": [_point(models__0__model="a\x00")]})),
    ("requests-past-integer", json.dumps({"type": "telemetry", "items": [_point(models__0__requests=2**40)]})),
    ("queue-depth-past-integer", json.dumps({"type": "telemetry",
                                             "items": [_point(resources__inference_queue_depth=2**31)]})),
    ("infinite-load", json.dumps({"type": "telemetry", "items": [_point(resources__load1=float("inf"))]})),
    ("overflowing-latency", json.dumps({"type": "telemetry", "items": [_point(models__0__latency_p50_ms=1.0)]})
     .replace('"latency_p50_ms": 1.0', '"latency_p50_ms": 1e999')),
    ("naive-time", json.dumps({"type": "telemetry", "items": [_point(at="2026-01-01T00:00:00")]})),
    ("time-out-of-range", json.dumps({"type": "telemetry", "items": [_point(at="0001-01-01T00:00:00+14:00")]})),
    ("deep", _deep(100_000)),
    ("not-an-object", "[]"),
    ("not-utf-8", b"\xff\xfe{"),
]


@pytest.mark.process
def test_it_answers_every_hostile_telemetry_frame_with_a_stream_error(live_control_plane: ControlPlane,
                                                                     site_berlin: Site) -> None:
    token = services.token_create(actor=Actor.system("test"), site=site_berlin)[1]
    node = httpx.post(f"{live_control_plane.url}/agent/v1/enroll", json={"token": token, "name": "gw-1"},
                      timeout=10).json()
    url = f"ws://127.0.0.1:{live_control_plane.port}/agent/v1/nodes/{node['node_id']}/stream"
    headers = {"Authorization": f"Bearer {node['credential']}"}

    log_start = live_control_plane.log.stat().st_size

    async def send(frame: str | bytes, *, closes: bool = True) -> tuple[dict[str, Any], int | None]:
        async with websockets.connect(url, additional_headers=headers, open_timeout=10) as ws:
            await ws.send(frame)
            answer = json.loads(await asyncio.wait_for(ws.recv(), timeout=10))
            if not closes:
                return answer, None
            try:
                await asyncio.wait_for(ws.recv(), timeout=10)
            except websockets.ConnectionClosed as closed:
                return answer, closed.rcvd.code if closed.rcvd else None
        return answer, None

    async def scenario() -> list[tuple[str, dict[str, Any], int | None]]:
        out = []
        for name, frame in HOSTILE_FRAMES:
            answer, code = await send(frame)
            out.append((name, answer, code))
        good, _ = await send(json.dumps({"type": "telemetry", "items": [_point(seq=5)]}), closes=False)
        out.append(("good", good, None))
        return out

    results = asyncio.run(scenario())
    for name, answer, code in results[:-1]:
        assert answer["type"] == "error" and answer["error"].startswith("invalid telemetry frame"), (name, answer)
        assert code == 4400, (name, code)
    # The stream and its shared committer are unharmed: the next good frame is committed and acknowledged.
    assert results[-1][1] == {"type": "telemetry.ack", "seq": 5}
    assert TelemetryStream.objects.get(node__uuid=node["node_id"]).last_seq == 5
    assert "Traceback" not in live_control_plane.log.read_bytes()[log_start:].decode(errors="replace")


def test_it_leaves_out_an_answer_that_does_not_merge_with_the_others(client: Client, estate: Estate,  # noqa: F811
                                                                    admin_user: Any) -> None:
    from tests.queries.test_agent_endpoint import _answer

    query = create(admin_user, [estate.berlin, estate.ohio])
    berlin = json.loads(_answer(estate, query).model_dump_json())
    # Ohio's answer merges on its own, but says its minimum is text where Berlin's is a number.
    ohio = json.loads(json.dumps({**berlin, "site": "plant-ohio"}))
    minimum = next(a for a in ohio["partials"]["aggregates"] if a["op"] == "min")
    minimum["type"], minimum["min"] = "string", ["low"] * len(minimum["min"])
    for node, credential, body in ((estate.berlin_node, estate.berlin_credential, berlin),
                                   (estate.ohio_node, estate.ohio_credential, ohio)):
        response = client.post(f"/agent/v1/nodes/{node.uuid}/queries/{query.uuid}/result", json.dumps(body),
                               content_type="application/json", headers={"Authorization": f"Bearer {credential}"})
        assert response.status_code == 201, response.content
    query.refresh_from_db()
    merged = json.loads(query.result_json)
    assert query.state == "partial"
    sites = {s["site"]: s for s in merged["sites"]}
    assert sites["plant-berlin"]["status"] == "answered"
    assert sites["plant-ohio"]["status"] == "error" and "cannot be merged" in sites["plant-ohio"]["reason"]
    assert merged["rows"] and all(row[merged["columns"].index("min_temperature")] is not None
                                  for row in merged["rows"])
