"""GET /metrics: the Prometheus text format, read as Prometheus reads it, and who may read it."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import signature
from django.conf import settings as django_settings
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from metrics import counters
from queries.models import FederatedQuery, QuerySite
from rollouts.models import Rollout
from sites.models import Connectivity, Node, Site
from tests.fixtures.personas import PASSWORD, make_site
from tests.models_registry.helpers import make_model, make_node, upload

pytestmark = pytest.mark.django_db

REPO = Path(__file__).resolve().parents[2]
TOKEN = "metrics-" + "t" * 40


@pytest.fixture(autouse=True)
def fresh_counters(settings: Any) -> Iterator[None]:
    """Each test counts from zero: the counters are shared by every process of this run, this one included."""
    settings.METRICS_TOKEN = TOKEN
    # Wide enough that a node synced at the start of a test is still online at its scrape.
    settings.NODE_STALE_AFTER_S, settings.NODE_OFFLINE_AFTER_S = 60.0, 600.0
    store = counters.store()  # this run's Redis, even if a test points REDIS_URL elsewhere
    store.clear()
    yield
    store.clear()


def scrape(client: Client | None = None, token: str = TOKEN) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of one scrape, parsed by prometheus_client."""
    response = (client or Client()).get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = response.content.decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        assert f"# HELP {family.name}" in text and f"# TYPE {family.name}" in text
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def series(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> dict[str, float]:
    """The samples named ``name``, keyed by their labels' values joined with '|'."""
    return {"|".join(v for _, v in labels): value for (n, labels), value in samples.items() if n == name}


def sync(client: Client, node: Node, credential: str) -> int:
    return client.post(f"/agent/v1/nodes/{node.uuid}/sync", json.dumps({}), content_type="application/json",
                       headers={"Authorization": f"Bearer {credential}"}).status_code


def test_it_counts_requests_by_route_and_status_class_never_by_path() -> None:
    client = Client()
    assert client.get("/agent/v1/health").status_code == 200
    assert client.get("/agent/v1/health").status_code == 200
    assert client.get("/login/").status_code == 200
    # Two made-up paths and a node id nobody has: bounded label values, whatever the path.
    assert client.get("/no/such/page").status_code == 404
    assert client.get(f"/{uuid.uuid4()}").status_code == 404
    assert client.post(f"/agent/v1/nodes/{uuid.uuid4()}/sync", "{}", content_type="application/json").status_code \
        == 401
    requests = series(scrape(client), "edgewise_http_requests_total")
    assert requests == {"agent:health|2xx": 2, "login|2xx": 1, "unmatched|4xx": 2, "agent:node-sync|4xx": 1}


def test_it_counts_syncs_by_outcome_with_their_duration(site_berlin: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    node, credential = make_node(site_berlin, "gw-1")
    client = Client(raise_request_exception=False)
    assert sync(client, node, credential) == 200
    assert sync(client, node, credential) == 200
    assert sync(client, node, "ewn_not-this-nodes-credential") == 401

    def broken(**_: Any) -> None:
        raise RuntimeError("the database went away")

    monkeypatch.setattr("sites.agent_api.node_sync", broken)
    assert sync(client, node, credential) == 500
    samples = scrape(client)
    assert series(samples, "edgewise_node_syncs_total") == {"ok": 2, "refused": 1, "error": 1}
    assert series(samples, "edgewise_http_requests_total") == {"agent:node-sync|2xx": 2, "agent:node-sync|4xx": 1,
                                                               "agent:node-sync|5xx": 1}
    buckets = series(samples, "edgewise_node_sync_duration_seconds_bucket")
    assert buckets["+Inf"] == 4 and samples[("edgewise_node_sync_duration_seconds_count", ())] == 4
    assert list(buckets.values()) == sorted(buckets.values())  # cumulative
    assert 0 < samples[("edgewise_node_sync_duration_seconds_sum", ())] < 60


def test_it_puts_each_sync_duration_in_its_bucket_cumulatively() -> None:
    for seconds in (0.003, 0.005, 0.04, 0.3, 12.0):
        counters.request_count(route=counters.SYNC_ROUTE, status=200, seconds=seconds)
    samples = scrape()
    assert series(samples, "edgewise_node_sync_duration_seconds_bucket") == {
        "0.005": 2, "0.01": 2, "0.025": 2, "0.05": 3, "0.1": 3, "0.25": 3, "0.5": 4, "1.0": 4, "2.5": 4, "5.0": 4,
        "10.0": 4, "+Inf": 5}
    assert samples[("edgewise_node_sync_duration_seconds_sum", ())] == pytest.approx(12.348)
    assert samples[("edgewise_node_sync_duration_seconds_count", ())] == 5


def test_it_shows_rollouts_by_state_from_the_database() -> None:
    version = upload(make_model("defects"))
    for state in ("progressing", "progressing", "paused", "succeeded", "failed", "failed", "failed"):
        Rollout.objects.create(version=version, state=state)
    assert series(scrape(), "edgewise_rollouts") == {
        "pending_approval": 0, "ready": 0, "progressing": 2, "paused": 1, "rolling_back": 0, "succeeded": 1,
        "failed": 3, "aborted": 0, "rejected": 0}


def test_it_shows_nodes_by_the_status_the_console_shows(site_berlin: Site) -> None:
    now = timezone.now()
    client = Client()
    online, credential = make_node(site_berlin, "online")
    assert sync(client, online, credential) == 200  # a real sync sets last_seen_at
    for name, age in (("stale-1", 100), ("stale-2", 500), ("offline", 601)):
        Node.objects.filter(pk=make_node(site_berlin, name)[0].pk).update(
            last_seen_at=now - dt.timedelta(seconds=age))
    make_node(site_berlin, "never-synced")
    Node.objects.filter(pk=make_node(site_berlin, "revoked")[0].pk).update(revoked_at=now, last_seen_at=now)
    base = make_site(site_berlin.region, "base-7", connectivity=Connectivity.AIR_GAPPED)
    Node.objects.filter(pk=make_node(base, "s-1")[0].pk).update(last_seen_at=now - dt.timedelta(days=30))
    assert series(scrape(client), "edgewise_nodes") == {
        "pending": 1, "online": 1, "stale": 2, "offline": 1, "revoked": 1, "air-gapped": 1}


def test_it_shows_federated_queries_and_the_deliveries_still_waiting(site_berlin: Site) -> None:
    node = make_node(site_berlin, "gw-1")[0]
    now = timezone.now()
    states = {"pending": ["pending", "offline"], "running": ["sent", "answered"], "complete": ["answered"]}
    for query_state, site_states in states.items():
        for site_state in site_states:
            query = FederatedQuery.objects.create(spec={}, dataset="sensor", deadline=now, wait_until=now,
                                                  state=query_state)
            QuerySite.objects.create(query=query, site=site_berlin, node=node, state=site_state, deadline=now)
    samples = scrape()
    assert series(samples, "edgewise_federated_queries") == {
        "pending": 2, "running": 2, "complete": 1, "partial": 0, "failed": 0}
    assert series(samples, "edgewise_query_deliveries_waiting") == {"pending": 1, "sent": 1, "offline": 1,
                                                                    "bundle": 0}


def test_it_shows_the_tasks_waiting_in_the_celery_queue() -> None:
    queue = django_settings.CELERY_TASK_DEFAULT_QUEUE
    client = counters.redis_client(django_settings.CELERY_BROKER_URL)
    client.delete(*[queue] + [f"{queue}\x06\x16{step}" for step in (3, 6, 9)])
    try:
        # No worker takes from this run's queue here: what is sent waits, in kombu's list per priority.
        signature("sites.node_liveness_sweep").apply_async()
        signature("sites.node_liveness_sweep").apply_async()
        signature("sites.telemetry_prune").apply_async(priority=9)
        assert client.llen(f"{queue}\x06\x169") == 1
        assert series(scrape(), "edgewise_celery_queue_length") == {queue: 3}
    finally:
        client.delete(*[queue] + [f"{queue}\x06\x16{step}" for step in (3, 6, 9)])


def test_it_reads_each_gauge_with_one_query_however_large_the_fleet(site_berlin: Site,
                                                                    django_assert_num_queries: Any) -> None:
    version = upload(make_model("defects"))
    for i in range(5):
        make_node(site_berlin, f"n{i}")
        Rollout.objects.create(version=version, state="progressing")
    # Rollouts, nodes, federated queries, deliveries: one GROUP BY each, and nothing for the bearer.
    with django_assert_num_queries(4):
        scrape()


# The counting of another control-plane process: its own interpreter, its own Redis connection.
OTHER_PROCESS = """
import django
django.setup()
from metrics import counters
for _ in range({n}):
    counters.request_count(route="agent:health", status=200, seconds=0.01)
    counters.request_count(route=counters.SYNC_ROUTE, status=200, seconds=0.01)
"""


@pytest.mark.process
def test_it_shares_the_counters_of_every_process() -> None:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}  # this run's Redis, database and queue name
    others = [subprocess.Popen([sys.executable, "-c", OTHER_PROCESS.format(n=n)], cwd=REPO, env=env)
              for n in (3, 4)]
    assert [p.wait(timeout=60) for p in others] == [0, 0]
    assert Client().get("/agent/v1/health").status_code == 200  # and this one's own
    samples = scrape()
    assert series(samples, "edgewise_http_requests_total") == {"agent:health|2xx": 8, "agent:node-sync|2xx": 7}
    assert series(samples, "edgewise_node_syncs_total") == {"ok": 7, "refused": 0, "error": 0}


def test_it_answers_requests_and_refuses_the_scrape_while_redis_is_down(settings: Any) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    response = Client().get("/agent/v1/health")
    assert response.status_code == 200
    refused = Client().get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert refused.status_code == 503
    assert "the metrics store (Redis) cannot be reached" in refused.json()["error"]


def test_it_counts_in_the_process_of_an_install_without_redis(settings: Any) -> None:
    shared = counters.store()
    settings.REDIS_URL = ""  # embedded: one web process
    local = counters.store()
    try:
        assert Client().get("/agent/v1/health").status_code == 200
        assert series(scrape(), "edgewise_http_requests_total") == {"agent:health|2xx": 1}
        assert shared.read((counters.HTTP,)) == {counters.HTTP: {}}
    finally:
        local.clear()


def client_for(user: Any) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


@pytest.mark.parametrize(
    ("persona", "authorization", "configured", "status", "message"),
    [
        (None, None, True, 401, "metrics need Authorization: Bearer"),
        (None, "Basic bWV0cmljczp4", True, 401, "malformed Authorization header"),
        (None, "Bearer ", True, 401, "malformed Authorization header"),
        (None, "Bearer " + "x" * 48, True, 403, "wrong metrics token"),
        (None, f"Bearer {TOKEN}", False, 403, "no metrics token is configured"),
        ("operator", None, True, 403, "only an administrator or a scraper"),
        ("stranger", None, True, 403, "only an administrator or a scraper"),
        ("admin_user", "Bearer " + "x" * 48, True, 403, "wrong metrics token"),
    ],
    ids=["anonymous", "basic", "empty-bearer", "wrong-token", "no-token-configured", "operator", "stranger",
         "admin-with-a-wrong-token"],
)
def test_it_refuses_whoever_has_neither_the_token_nor_an_administrators_session(
        request: pytest.FixtureRequest, settings: Any, persona: str | None, authorization: str | None,
        configured: bool, status: int, message: str) -> None:
    if not configured:
        settings.METRICS_TOKEN = ""
    client = client_for(request.getfixturevalue(persona)) if persona else Client()
    headers = {"Authorization": authorization} if authorization else {}
    response = client.get("/metrics", headers=headers)
    assert response.status_code == status
    assert message in response.json()["error"]
    assert b"edgewise_" not in response.content
    assert (response.get("WWW-Authenticate") == 'Bearer realm="edgewise metrics"') is (status == 401)


def test_it_lets_an_administrators_session_read_the_metrics(admin_user: Any) -> None:
    response = client_for(admin_user).get("/metrics")
    assert response.status_code == 200
    assert "# TYPE edgewise_rollouts gauge" in response.content.decode()


def test_it_refuses_to_start_with_a_short_metrics_token() -> None:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "orchestrator.settings", "EDGEWISE_METRICS_TOKEN": "short"}
    result = subprocess.run([sys.executable, "-c", "import django; django.setup()"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "EDGEWISE_METRICS_TOKEN must be at least 32 characters" in result.stderr
