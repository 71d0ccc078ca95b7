"""Telemetry tables: the per-node high-water mark, the downsampled history, the gaps.

Imported by ``sites.models`` so that Django registers them with the app.
"""

from __future__ import annotations

from django.db import models

from core.permissions import RestrictedQuerySet, Scope

# Bucket widths of the history, in seconds.
FINE = 10
COARSE = 300
RESOLUTIONS = (FINE, COARSE)


class TelemetryStream(models.Model):
    """How far a node's telemetry has been committed. The idempotency mark: an item at or below ``last_seq`` is
    a duplicate."""

    node = models.OneToOneField("sites.Node", on_delete=models.CASCADE, related_name="telemetry_stream")
    last_seq = models.BigIntegerField(default=0)
    # Points committed, ever; with no gap, equal to last_seq.
    points = models.BigIntegerField(default=0)
    # Points the node reported lost, and points that never arrived.
    lost = models.BigIntegerField(default=0)
    # When the newest item was committed (control-plane clock): the link's last confirmation.
    received_at = models.DateTimeField(null=True, blank=True, db_index=True)
    # When the newest point was taken (node clock), and the point itself, for a page's first render.
    last_point_at = models.DateTimeField(null=True, blank=True)
    latest = models.JSONField(default=dict, blank=True)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.site("node__site")

    class Meta:
        app_label = "sites"

    def __str__(self) -> str:
        return f"telemetry of node {self.node_id} up to {self.last_seq}"


class TelemetrySample(models.Model):
    """One node's series in one bucket: model version figures, or (model "") the node's resources.

    Sums over the points folded in; a mean is the sum over ``points`` (or,
    for latency, over ``latency_weight``: the requests that had a latency).
    """

    node = models.ForeignKey("sites.Node", on_delete=models.CASCADE, related_name="telemetry_samples")
    resolution = models.PositiveIntegerField(choices=[(FINE, "10 s"), (COARSE, "5 min")])
    bucket = models.DateTimeField()
    model = models.CharField(max_length=100, blank=True)
    version = models.CharField(max_length=50, blank=True)
    points = models.PositiveIntegerField(default=0)
    # Seconds the folded points covered (their intervals): rates are counters over this.
    interval_sum = models.FloatField(default=0)
    # Model series.
    requests = models.BigIntegerField(default=0)
    errors = models.BigIntegerField(default=0)
    batches = models.BigIntegerField(default=0)
    batch_items = models.FloatField(default=0)
    latency_weight = models.BigIntegerField(default=0)
    latency_p50_wsum = models.FloatField(default=0)
    latency_p95_wsum = models.FloatField(default=0)
    latency_p95_max = models.FloatField(default=0)
    queue_depth_max = models.IntegerField(default=0)
    # Resource series.
    cpu_sum = models.FloatField(default=0)
    cpu_max = models.FloatField(default=0)
    load_sum = models.FloatField(default=0)
    memory_used_sum = models.FloatField(default=0)
    memory_total_max = models.FloatField(default=0)
    disk_used_sum = models.FloatField(default=0)
    disk_total_max = models.FloatField(default=0)
    backlog_max = models.IntegerField(default=0)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.site("node__site")

    class Meta:
        app_label = "sites"
        constraints = [
            models.UniqueConstraint(fields=["node", "resolution", "model", "version", "bucket"],
                                    name="telemetry_sample_unique_bucket"),
        ]
        indexes = [
            models.Index(fields=["resolution", "bucket"], name="telemetry_sample_age"),
            models.Index(fields=["model", "version", "resolution", "bucket"], name="telemetry_sample_model"),
        ]

    def __str__(self) -> str:
        series = f"{self.model}@{self.version}" if self.model else "resources"
        return f"node {self.node_id} {series} {self.resolution}s @ {self.bucket.isoformat()}"


class GapReason(models.TextChoices):
    DISK_BUDGET = "disk_budget", "Node's disk budget ran out"  # the node dropped its oldest points, and said so
    MISSING = "missing", "Never arrived"  # a sequence number was skipped without a gap record


class TelemetryGap(models.Model):
    node = models.ForeignKey("sites.Node", on_delete=models.CASCADE, related_name="telemetry_gaps")
    first_seq = models.BigIntegerField()
    last_seq = models.BigIntegerField()
    count = models.BigIntegerField()
    # The period the lost points covered (node clock); unknown for missing points.
    start = models.DateTimeField(null=True, blank=True)
    end = models.DateTimeField(null=True, blank=True)
    reason = models.CharField(max_length=20, choices=GapReason.choices)
    received_at = models.DateTimeField(db_index=True)

    objects = RestrictedQuerySet.as_manager()
    scope = Scope.site("node__site")

    class Meta:
        app_label = "sites"
        ordering = ["node", "first_seq"]

    def __str__(self) -> str:
        return f"node {self.node_id} lost {self.count} point(s) {self.first_seq}-{self.last_seq}"
