"""Running a federated query on this node, with pandas, under the site's data policy.

:func:`run_query` is what the agent calls. In order, each step able to stop
the query with a refusal that names the rule or the field:

1. audit ``query.received`` (if the record cannot be written, nothing runs);
2. parse the spec (:mod:`~edge_runtime.data.spec`) and bind it to the
   dataset's schema from the catalog;
3. evaluate the data policy (:mod:`edge_runtime.policy.data`);
4. load only the columns the query uses (:mod:`~edge_runtime.data.sources`),
   then apply every filter in pandas;
5. score with the node's model if asked, bucket times, group, and compute
   the partial aggregates per group (:mod:`~edge_runtime.data.compute`);
6. suppress cells under ``k`` rows and check the output size;
7. audit the decision (``query.answered``, ``query.refused`` or
   ``query.error``) and return it.

It never raises: anything unexpected becomes an ``error`` result. It is
synchronous and CPU-bound; the agent runs it in a worker thread.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from edge_runtime.audit import AuditError, NodeAudit
from edge_runtime.data.binding import BoundQuery, bind
from edge_runtime.data.catalog import Catalog, CatalogError
from edge_runtime.data.chunks import chunked_row_groups, merge_chunks, read_chunks
from edge_runtime.data.compute import (
    Array,
    Scorer,
    apply_score,
    build_partials,
    build_rows,
    compute_partials,
    filter_mask,
)
from edge_runtime.data.grouping import Groups
from edge_runtime.data.sources import ExecutionError, load_frame, one_line
from edge_runtime.data.spec import QuerySpec, SpecError, parse_spec
from edge_runtime.data.wire import Partials, QueryResult, Suppressed
from edge_runtime.policy.data import DataPolicy, Decision, SiteFacts, check_output_size, evaluate, suppression_mask
from edge_runtime.signing import canonical_json

__all__ = ["Array", "ExecutionError", "QueryDeadline", "Scorer", "run_query", "spec_digest"]

logger = logging.getLogger("edge_runtime.data")


class QueryDeadline(ExecutionError):
    pass



def spec_digest(spec_json: Any) -> str:
    return hashlib.sha256(canonical_json(spec_json).encode()).hexdigest()


@dataclass
class _Context:
    query_id: str
    site: str
    digest: str
    started: float
    audit: NodeAudit | None
    rows_scanned: int = 0

    def elapsed_ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000.0, 3)

    def record(self, action: str, detail: dict[str, Any], *, durable: bool = True) -> int | None:
        if self.audit is None:
            return None
        return self.audit.append(action, {"query_id": self.query_id, "spec_digest": self.digest, **detail},
                                 durable=durable).seq

    def finish(self, status: str, **fields: Any) -> QueryResult:
        result = QueryResult(query_id=self.query_id, site=self.site, status=status,  # type: ignore[arg-type]
                             spec_digest=self.digest, rows_scanned=self.rows_scanned,
                             elapsed_ms=self.elapsed_ms(), **fields)
        detail: dict[str, Any] = {"status": status, "reason": result.reason, "rule": result.rule,
                                  "field": result.field, "rows_scanned": result.rows_scanned,
                                  "elapsed_ms": result.elapsed_ms}
        if status == "answered":
            detail.update(suppressed_cells=result.suppressed.cells, suppressed_rows=result.suppressed.rows,
                          groups=len(result.partials.rows) if result.partials else None,
                          rows_out=len(result.rows.values) if result.rows else None)
        seq = self.record(f"query.{status}", detail)
        return result.model_copy(update={"audit_seq": seq})


def run_query(
    spec_json: Any,
    *,
    catalog: Catalog,
    policy: DataPolicy,
    site_facts: SiteFacts,
    scorer: Scorer | None = None,
    audit: NodeAudit | None = None,
    query_id: str = "",
    deadline: dt.datetime | None = None,
) -> QueryResult:
    """Run one federated query here; always returns a result (answered, refused or error), never raises."""
    ctx = _Context(query_id=query_id, site=site_facts.site, digest=spec_digest(spec_json),
                   started=time.perf_counter(), audit=audit)
    try:
        # Made durable by the decision's record, which is synced before anything leaves.
        ctx.record("query.received", {"spec": spec_json if isinstance(spec_json, dict) else repr(spec_json)[:1000]},
                   durable=False)
    except AuditError as exc:
        logger.error("query %s not run: %s", query_id, exc)
        return QueryResult(query_id=query_id, site=site_facts.site, status="error", spec_digest=ctx.digest,
                           reason=f"the node's audit log cannot be written, so the query did not run: {exc}")
    try:
        return _run(spec_json, ctx, catalog=catalog, policy=policy, facts=site_facts, scorer=scorer,
                    deadline=deadline)
    except AuditError as exc:
        logger.error("query %s: %s", query_id, exc)
        return QueryResult(query_id=query_id, site=site_facts.site, status="error", spec_digest=ctx.digest,
                           reason=f"the node's audit log cannot be written, so nothing was released: {exc}")
    except Exception as exc:  # noqa: BLE001 - a query must never take the agent down; the error is reported
        logger.exception("query %s failed", query_id)
        return ctx.finish("error", reason=f"the query failed on the node: {one_line(exc)}")


def _run(spec_json: Any, ctx: _Context, *, catalog: Catalog, policy: DataPolicy, facts: SiteFacts,
         scorer: Scorer | None, deadline: dt.datetime | None) -> QueryResult:
    try:
        if len(canonical_json(spec_json)) > 64 * 1024:
            raise SpecError("spec", "the query document is larger than 64 KiB")
        spec = parse_spec(spec_json)
        dataset = catalog.get(spec.dataset)
        if dataset is None:
            raise SpecError("dataset", f"unknown dataset {spec.dataset!r} (datasets: "
                            f"{', '.join(catalog.names()) or 'none'})")
        schema = dataset.schema()
        bound = bind(spec, schema)
    except SpecError as exc:
        return ctx.finish("refused", reason=str(exc), field=exc.field)
    except CatalogError as exc:
        return ctx.finish("error", reason=str(exc), field="dataset")

    decision = _policy_decision(policy, facts, bound)
    if not decision.allowed:
        return ctx.finish("refused", reason=decision.reason, rule=decision.rule, field=decision.field)
    ctx.rows_scanned = schema.row_count
    try:
        _check_deadline(deadline)
        chunks = chunked_row_groups(dataset, bound)
        if chunks is not None:
            # A large Parquet file, aggregated: a chunk at a time, the next one read meanwhile.
            parts = []
            for chunk in read_chunks(dataset, bound, chunks):
                parts.append(compute_partials(_filter_and_score(chunk, bound, scorer), bound))
                _check_deadline(deadline)
            groups, states = merge_chunks(bound, parts)
            return _answer_partials(ctx, policy, bound, groups, states, deadline)
        frame = load_frame(dataset, bound)
        ctx.rows_scanned = max(ctx.rows_scanned, len(frame))
        frame = _filter_and_score(frame, bound, scorer)
        _check_deadline(deadline)
        if spec.mode == "rows":
            rows = build_rows(frame, bound)
            cells = len(rows.values) * len(rows.columns)
            size = check_output_size(policy, cells=cells, size_bytes=len(rows.model_dump_json()))
            if not size.allowed:
                return ctx.finish("refused", reason=size.reason, rule=size.rule)
            return ctx.finish("answered", rows=rows)
        groups, states = compute_partials(frame, bound)
        return _answer_partials(ctx, policy, bound, groups, states, deadline)
    except CatalogError as exc:
        return ctx.finish("error", reason=str(exc), field="dataset")
    except ExecutionError as exc:
        return ctx.finish("error", reason=str(exc), field=exc.field)


def _filter_and_score(frame: pd.DataFrame, bound: BoundQuery, scorer: Scorer | None) -> pd.DataFrame:
    """The rows the query keeps: filters on source columns, then the model's scores, then filters on those."""
    pre = [f for f in bound.filters if not f.after_score]
    if pre:
        frame = frame.loc[filter_mask(frame, pre)]
    frame = apply_score(frame, bound, scorer)
    post = [f for f in bound.filters if f.after_score]
    if post:
        frame = frame.loc[filter_mask(frame, post)]
    return frame


def _answer_partials(ctx: _Context, policy: DataPolicy, bound: BoundQuery, groups: Groups,
                     states: list[dict[str, Any]], deadline: dt.datetime | None) -> QueryResult:
    """k-suppression, the output limits, and the answer."""
    keep, suppression = suppression_mask(groups.rows.tolist(), policy.min_group_size)
    partials = build_partials(bound, groups, states, np.asarray(keep, dtype=bool))
    cells = len(partials.rows) * (len(partials.key_names) + len(partials.aggregates))
    size = check_output_size(policy, cells=cells, size_bytes=_partials_size(partials, policy.max_output_bytes))
    if not size.allowed:
        return ctx.finish("refused", reason=size.reason, rule=size.rule)
    _check_deadline(deadline)
    return ctx.finish("answered", partials=partials,
                      suppressed=Suppressed(cells=suppression.cells, rows=suppression.rows))


# No JSON value of a partial's fixed-size state is longer than this (an ISO timestamp with microseconds, quoted, or
# a float's repr, plus a separator).
_MAX_VALUE_BYTES = 32


def _partials_size(partials: Partials, limit: int) -> int:
    """The partials' JSON size, or an upper bound of it when that is already within ``limit``.

    Serialising tens of thousands of groups only to learn that they fit would cost as much as grouping
    them. Strings are counted at six bytes a character (the longest JSON escape); sketches have no fixed
    size, so with quantiles the size is always measured.
    """
    if all(a.sketch is None for a in partials.aggregates):
        states = sum(sum(getattr(a, f) is not None for f in ("n", "sum", "mean", "m2", "min", "max"))
                     for a in partials.aggregates)
        bound = len(partials.rows) * (1 + len(partials.key_names) + states) * _MAX_VALUE_BYTES
        bound += 1024 * (1 + len(partials.aggregates))
        for column, type_ in zip(partials.keys, partials.key_types, strict=True):
            if type_ == "string":
                bound += sum(6 * len(v) for v in column if isinstance(v, str))
        if bound <= limit:
            return bound
    return len(partials.model_dump_json())


def _policy_decision(policy: DataPolicy, facts: SiteFacts, bound: BoundQuery) -> Decision:
    spec: QuerySpec = bound.spec
    return evaluate(policy, facts, dataset=spec.dataset, mode=spec.mode, columns=bound.columns_used(),
                    aggregates=[(f"aggregates.{i}.op", a.op) for i, a in enumerate(spec.aggregates)],
                    model=spec.score.model if spec.score else None)


def _check_deadline(deadline: dt.datetime | None) -> None:
    if deadline is not None and dt.datetime.now(dt.UTC) > deadline:
        raise QueryDeadline(f"the query's deadline ({deadline.isoformat()}) has passed")
