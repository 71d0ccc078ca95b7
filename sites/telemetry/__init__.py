"""Live telemetry of the fleet, at the control plane.

Nodes send :class:`~edge_runtime.protocol.TelemetryFrame` messages over their
websocket (``sites.consumers.NodeStreamConsumer``). The consumer hands each
frame to the process's :class:`~sites.telemetry.committer.Committer`, which
commits the frames of every node stream in the process together (one
transaction per round, however many nodes), and acknowledges a frame only
once that transaction has committed, with the highest sequence number held
for the node.

What is kept (:mod:`sites.telemetry.models`):

* per node a :class:`TelemetryStream`: the highest sequence number committed
  (the idempotency mark: an item at or below it is a duplicate and is
  skipped, so a frame sent twice counts once), how many points and how many
  lost points it has brought, when the newest item arrived and the newest
  point itself;
* :class:`TelemetrySample` rows, the downsampled history: every point is
  folded, as it is committed, into its 10 s bucket and its 5 min bucket, one
  row per node, series (the node's resources, or one model version) and
  bucket. Counters are summed, gauges are summed for a mean and kept as a
  maximum, latency percentiles are summed weighted by requests (so a
  bucket's p95 is the request-weighted mean of the nodes' interval p95s, and
  its maximum is kept too). A late point (a backlog after an outage) lands
  in the buckets of the time it was taken. Fine rows are kept for
  ``EDGEWISE_TELEMETRY_FINE_RETENTION`` (6 h), coarse rows for
  ``EDGEWISE_TELEMETRY_COARSE_RETENTION`` (30 days), pruned by the
  ``sites.telemetry_prune`` beat task;
* :class:`TelemetryGap` rows: points a node reported lost to its disk budget,
  and points that never arrived (a sequence number skipped: should not
  happen, and is recorded rather than hidden when it does).

After each commit the points are broadcast (``orchestrator.realtime``) to
``site-<uuid>`` (full points, for the site page's charts) and a summary to
``fleet`` (per site and node: the newest sequence number and when it was
confirmed), merged per group with those of the other commits of the same
short interval (``committer.Outbox``: every point, each node's newest mark),
where :class:`~sites.consumers.FleetConsumer` and
:class:`~sites.consumers.SiteConsumer` pass on to each browser only the
sites its user may see.
"""
