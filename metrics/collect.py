"""Every metric family of a scrape: the shared counters, and gauges read when Prometheus asks.

Each gauge is one aggregate query (``GROUP BY`` state or status) or, for the
Celery queues, one pipelined round trip to the broker, so a scrape costs the
same for ten nodes as for ten thousand. Every state a gauge has is written,
zeros included, so a series that drops to zero reads 0 instead of vanishing.
"""

from __future__ import annotations

import datetime as dt

from django.conf import settings
from django.db.models import Case, CharField, Count, QuerySet, Value, When
from kombu.transport.redis import PRIORITY_STEPS
from kombu.transport.redis import Channel as RedisChannel

from metrics import counters
from metrics.exposition import Family
from queries.models import OPEN_SITE_STATES, FederatedQuery, QuerySite, QueryState
from rollouts.models import Rollout, RolloutState
from sites.liveness import AIR_GAPPED
from sites.models import Connectivity, Node, NodeStatus

NODE_STATUSES = (NodeStatus.PENDING, NodeStatus.ONLINE, NodeStatus.STALE, NodeStatus.OFFLINE, NodeStatus.REVOKED,
                 AIR_GAPPED)


def _counts(queryset: QuerySet, column: str) -> dict[str, int]:
    # order_by(): no model's default ordering may slip into the GROUP BY.
    return {key: n for key, n in queryset.order_by().values_list(column).annotate(n=Count("pk"))}


def _gauge(name: str, help: str, label: str, keys: tuple[str, ...], counts: dict[str, int]) -> Family:
    family = Family(name, "gauge", help)
    for key in keys:
        family.add(counts.get(key, 0), **{label: str(key)})
    return family


def nodes_by_status(*, now: dt.datetime) -> dict[str, int]:
    """Nodes by the status the console shows (``sites.liveness.node_status`` and ``shown_status``), derived from
    each node's last sync in the query itself rather than read from the liveness sweep's last run."""
    status = Case(
        When(revoked_at__isnull=False, then=Value(NodeStatus.REVOKED)),
        When(site__connectivity=Connectivity.AIR_GAPPED, then=Value(AIR_GAPPED)),
        When(last_seen_at__isnull=True, then=Value(NodeStatus.PENDING)),
        When(last_seen_at__gte=now - dt.timedelta(seconds=settings.NODE_STALE_AFTER_S),
             then=Value(NodeStatus.ONLINE)),
        When(last_seen_at__gte=now - dt.timedelta(seconds=settings.NODE_OFFLINE_AFTER_S),
             then=Value(NodeStatus.STALE)),
        default=Value(NodeStatus.OFFLINE), output_field=CharField(),
    )
    return _counts(Node.objects.annotate(shown=status), "shown")


def celery_queues() -> tuple[str, ...]:
    """The queues the project's tasks go to: every task goes to the default queue (no task routes)."""
    return (settings.CELERY_TASK_DEFAULT_QUEUE,)


def celery_queue_lengths() -> dict[str, int] | None:
    """Messages waiting in each queue (not yet taken by a worker), as kombu's Redis transport counts them: one
    list per priority step. None when the broker is not Redis (an embedded install's filesystem broker)."""
    if not settings.CELERY_BROKER_URL.startswith(("redis://", "rediss://", "unix://")):
        return None
    queues = celery_queues()
    pipe = counters.redis_client(settings.CELERY_BROKER_URL).pipeline(transaction=False)
    for queue in queues:
        for step in PRIORITY_STEPS:
            pipe.llen(f"{queue}{RedisChannel.sep}{step}" if step else queue)
    lengths = pipe.execute()
    per = len(PRIORITY_STEPS)
    return {queue: sum(lengths[i * per:(i + 1) * per]) for i, queue in enumerate(queues)}


def gauge_families(*, now: dt.datetime) -> list[Family]:
    families = [
        _gauge("edgewise_rollouts", "Rollouts by state.", "state", tuple(RolloutState.values),
               _counts(Rollout.objects.all(), "state")),
        _gauge("edgewise_nodes", "Nodes by the status the console shows (from the age of their last sync).",
               "status", NODE_STATUSES, nodes_by_status(now=now)),
        _gauge("edgewise_federated_queries", "Federated queries by state (pending and running are still open).",
               "state", tuple(QueryState.values), _counts(FederatedQuery.objects.all(), "state")),
        _gauge("edgewise_query_deliveries_waiting",
               "Federated query deliveries to a site still waiting for its answer, by state.",
               "state", tuple(OPEN_SITE_STATES), _counts(QuerySite.objects.filter(state__in=OPEN_SITE_STATES),
                                                         "state")),
    ]
    lengths = celery_queue_lengths()
    if lengths is not None:
        families.append(_gauge("edgewise_celery_queue_length", "Celery tasks waiting in the broker, by queue.",
                               "queue", tuple(lengths), lengths))
    return families


def counter_families() -> list[Family]:
    hashes = counters.counters_read()
    requests = Family("edgewise_http_requests_total", "counter",
                      "HTTP requests handled, by URL name (route) and status class.")
    for key, value in sorted(hashes[counters.HTTP].items()):
        route, _, status = key.rpartition("|")
        requests.add(value, route=route, status=status)
    sync = hashes[counters.SYNC]
    syncs = Family("edgewise_node_syncs_total", "counter",
                   "Node syncs (POST /agent/v1/nodes/<id>/sync), by outcome: ok, refused (4xx), error (5xx).")
    for outcome in counters.SYNC_OUTCOMES:
        syncs.add(sync.get(f"outcome:{outcome}", 0), outcome=outcome)
    paths = Family("edgewise_node_syncs_by_path_total", "counter",
                   "Node syncs answered, by the path they took: quiet (from Redis, no database), full, "
                   "report-wanted (a brief sync whose report the control plane does not hold).")
    for path in counters.SYNC_PATHS:
        paths.add(sync.get(f"path:{path}", 0), path=path)
    duration = Family("edgewise_node_sync_duration_seconds", "histogram",
                      "Time the control plane took to answer a node's sync, whatever the outcome.")
    total = 0.0
    for bound in [*map(str, counters.SYNC_BUCKETS), counters.INF]:
        total += sync.get(f"le:{bound}", 0)
        duration.add(total, "_bucket", le=bound)
    duration.add(sync.get("sum", 0.0), "_sum")
    duration.add(total, "_count")
    return [requests, syncs, paths, duration]


def metric_families(*, now: dt.datetime) -> list[Family]:
    """Everything one scrape shows. Raises redis.RedisError when Redis cannot be reached."""
    return [*counter_families(), *gauge_families(now=now)]
