"""The dataset catalog, federated queries, and each site's part in them.

A :class:`DatasetSchema` is what one node reported about one dataset: its
columns and types and its row count, never a row. A
:class:`FederatedQuery` is one query document sent to several sites; each
target site has a :class:`QuerySite` (the node chosen to answer there, its
state and its answer), and every transition of either writes a
:class:`QueryEvent`, which is also the page's timeline.

Answers are stored as the JSON text the node sent (``result_json``) and the
merged result as the JSON text the merge produced: both may carry the JSON
constants ``NaN`` and ``Infinity`` (a sample deviation of one value), which a
PostgreSQL ``jsonb`` column would refuse and which must reach the merge
unchanged.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from django.conf import settings
from django.db import models

from core.permissions import RestrictedQuerySet, Scope


class DatasetSchema(models.Model):
    node = models.ForeignKey("sites.Node", on_delete=models.CASCADE, related_name="dataset_schemas")
    name = models.CharField(max_length=64)
    kind = models.CharField(max_length=10, blank=True)
    # edge_runtime.data.catalog.DatasetSchema as the node reported it (columns with logical types, time column,
    # description, ignored columns); empty when the node could not read the dataset.
    schema = models.JSONField(default=dict, blank=True)
    row_count = models.BigIntegerField(default=0)
    # Why the node could not read the dataset; such a dataset cannot be queried there.
    error = models.CharField(max_length=500, blank=True)
    reported_at = models.DateTimeField()

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.site("node__site")

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["node", "name"], name="dataset_schema_unique_per_node")]

    def __str__(self) -> str:
        return f"{self.name} at {self.node}"

    @property
    def columns(self) -> list[dict[str, str]]:
        return list(self.schema.get("columns") or [])


class QueryState(models.TextChoices):
    PENDING = "pending", "Pending"  # created; no target node has received it yet
    RUNNING = "running", "Running"  # received by at least one node; some site has no final answer yet
    COMPLETE = "complete", "Complete"  # every target site answered; the merged result covers them all
    PARTIAL = "partial", "Partial"  # some sites answered, others refused, failed or timed out; merged from those
    FAILED = "failed", "Failed"  # no site answered


FINAL_QUERY_STATES = frozenset({QueryState.COMPLETE, QueryState.PARTIAL, QueryState.FAILED})


class OfflineBehaviour(models.TextChoices):
    # A site whose node is not online when the query is created keeps it waiting until the longer wait deadline,
    # and answers when its node syncs again.
    WAIT = "wait", "Wait for offline sites to come back"
    # Every site has the answer deadline; one still offline then is reported timed out.
    TIMEOUT = "timeout", "Report offline sites as timed out"


class FederatedQuery(models.Model):
    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    # The query document as validated by edge_runtime.data.spec (defaults filled in).
    spec = models.JSONField()
    dataset = models.CharField(max_length=64)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    offline_behaviour = models.CharField(max_length=10, choices=OfflineBehaviour.choices,
                                         default=OfflineBehaviour.WAIT)
    # Sites online at creation (and every site under TIMEOUT) must answer by this.
    deadline = models.DateTimeField()
    # Under WAIT, sites offline at creation may answer until this.
    wait_until = models.DateTimeField()
    state = models.CharField(max_length=10, choices=QueryState.choices, default=QueryState.PENDING, db_index=True)
    # edge_runtime.data.merge.MergedResult as JSON text, once every site is final.
    result_json = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.owned("created_by")

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "federated queries"

    def __str__(self) -> str:
        return f"query {self.dataset} {str(self.uuid)[:8]}"

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_QUERY_STATES

    def merged(self) -> dict[str, Any] | None:
        # json (not pydantic) reads the NaN and Infinity constants back as floats.
        return json.loads(self.result_json) if self.result_json else None


class SiteState(models.TextChoices):
    PENDING = "pending", "Pending"  # waiting for the node's next sync
    SENT = "sent", "Sent"  # handed to the node in a sync answer; running there
    OFFLINE = "offline", "Offline"  # the node was not online at creation; offered again when it syncs
    # The site is air-gapped: the query travels in its next bundle in, the answer in a bundle out.
    BUNDLE = "bundle", "Waiting for bundle"
    ANSWERED = "answered", "Answered"  # the node's partial result is stored
    REFUSED = "refused", "Refused"  # the site's policy or the spec stopped it; rule/field say which
    TIMED_OUT = "timed_out", "Timed out"  # no answer by the site's deadline
    ERROR = "error", "Error"  # the node could not run it (a file gone, a model that failed)


OPEN_SITE_STATES = (SiteState.PENDING, SiteState.SENT, SiteState.OFFLINE, SiteState.BUNDLE)
FINAL_SITE_STATES = frozenset({SiteState.ANSWERED, SiteState.REFUSED, SiteState.TIMED_OUT, SiteState.ERROR})


class QuerySite(models.Model):
    query = models.ForeignKey(FederatedQuery, on_delete=models.CASCADE, related_name="sites")
    site = models.ForeignKey("sites.Site", on_delete=models.PROTECT, related_name="+")
    node = models.ForeignKey("sites.Node", on_delete=models.PROTECT, related_name="+")
    state = models.CharField(max_length=10, choices=SiteState.choices, default=SiteState.PENDING)
    deadline = models.DateTimeField()
    reason = models.CharField(max_length=1000, blank=True)
    rule = models.CharField(max_length=40, blank=True)
    field = models.CharField(max_length=100, blank=True)
    # edge_runtime.data.wire.QueryResult as the node sent it (JSON text), when it answered.
    result_json = models.TextField(blank=True)
    suppressed_cells = models.PositiveIntegerField(default=0)
    # None: withheld by the site (its suppressed cells held fewer than k rows in all).
    suppressed_rows = models.PositiveIntegerField(null=True, blank=True, default=0)
    rows_scanned = models.BigIntegerField(default=0)
    elapsed_ms = models.FloatField(default=0.0)
    # The decision's record in the node's own audit chain.
    node_audit_seq = models.BigIntegerField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    answered_at = models.DateTimeField(null=True, blank=True)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.owned("query__created_by")

    class Meta:
        ordering = ["site__name"]
        constraints = [models.UniqueConstraint(fields=["query", "site"], name="query_site_unique")]
        indexes = [models.Index(fields=["node", "state"], name="query_site_node_state")]

    def __str__(self) -> str:
        return f"{self.query} at {self.site.slug}"

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_SITE_STATES


class QueryEvent(models.Model):
    """One transition of a query or of one site's part in it."""

    query = models.ForeignKey(FederatedQuery, on_delete=models.CASCADE, related_name="events")
    site = models.ForeignKey("sites.Site", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    from_state = models.CharField(max_length=10, blank=True)
    to_state = models.CharField(max_length=10)
    detail = models.JSONField(default=dict, blank=True)
    at = models.DateTimeField(auto_now_add=True, db_index=True)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.owned("query__created_by")

    class Meta:
        ordering = ["at", "pk"]

    def __str__(self) -> str:
        return f"{self.query} {self.from_state or '-'} -> {self.to_state}"
