"""The data policy: what a federated query may use at a site, and what may leave it.

A :class:`DataPolicy` is plain data, signed into a node's desired state and
evaluated by the node before and after it runs a query. Its rules, each
named in every refusal so that an operator sees which one spoke:

``datasets``
    Only the datasets listed may be queried; a site with no list answers
    nothing (the default is to refuse).
``columns``
    Per dataset, the columns a query may touch at all (filters, scoring
    inputs, aggregates). ``group_columns`` narrows the columns that may be
    group keys (they appear in the result as values), ``row_columns`` the
    columns a rows-mode query may return.
``aggregates``
    The aggregate operators allowed (``min``/``max`` reveal single values;
    a site may take them away).
``models``
    The models a query may score with (``None``: any model the node serves).
``rows``
    Row-level output needs ``allow_rows`` in the policy *and* in the
    dataset's rule, and is never allowed at a sovereign or air-gapped site,
    whatever the policy says (``rows.site``).
``min_group_size``
    ``k``: a group (cell) with fewer than ``k`` rows is suppressed: not
    returned, only counted. The rows in suppressed cells are reported only
    when they total at least ``k`` themselves, since a single suppressed
    cell's row count is exactly what suppression hides.
``max_output_cells`` / ``max_output_bytes``
    A result larger than either is refused, never truncated: a truncated
    partial aggregate would make the merged result silently wrong.

:class:`SiteFacts` are what the node knows about its site from the control
plane (connectivity, sovereignty); they can only tighten the policy.

The control plane keeps one :class:`DataPolicyDocument` for the estate: rules
that select sites as placement rules do, each giving the selected sites'
:class:`DataPolicy`; :meth:`DataPolicyDocument.for_site` resolves the one in
force at a site, which is signed into its nodes' desired state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from edge_runtime.policy.placement import RULE_NAME_PATTERN, PolicyDocument, SiteSelector, unique_rule_names
from edge_runtime.policy.placement import SiteFacts as PlacementSiteFacts

RuleName = Literal[
    "datasets", "columns", "group_columns", "row_columns", "aggregates", "models", "rows", "rows.site",
    "min_group_size", "max_output_cells", "max_output_bytes",
]
Connectivity = Literal["connected", "intermittent", "air_gapped"]
AggregateName = Literal["count", "sum", "mean", "min", "max", "std", "var", "quantile"]
ALL_AGGREGATES: tuple[AggregateName, ...] = ("count", "sum", "mean", "min", "max", "std", "var", "quantile")


class _Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetRule(_Policy):
    # None: every column of the dataset.
    columns: list[str] | None = None
    group_columns: list[str] | None = None
    allow_rows: bool = False
    row_columns: list[str] | None = None


class DataPolicy(_Policy):
    """One site's data policy (the ``data`` part of its policy bundle)."""

    datasets: dict[str, DatasetRule] = Field(default_factory=dict)
    aggregates: list[AggregateName] = Field(default_factory=lambda: list(ALL_AGGREGATES))
    models: list[str] | None = None
    min_group_size: int = Field(default=5, ge=1, le=1_000_000)
    allow_rows: bool = False
    max_output_cells: int = Field(default=100_000, ge=1)
    max_output_bytes: int = Field(default=8 * 1024 * 1024, ge=1)


class SiteFacts(_Policy):
    """What the node knows about its site; set by the control plane, never by a query."""

    site: str = ""
    connectivity: Connectivity = "connected"
    # Data that may not leave the site's jurisdiction in any row-level form.
    sovereign: bool = False
    jurisdiction: str = ""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: RuleName | None = None
    reason: str = ""
    field: str | None = None

    @classmethod
    def allow(cls) -> Decision:
        return cls(allowed=True)

    @classmethod
    def refuse(cls, rule: RuleName, reason: str, field: str | None = None) -> Decision:
        return cls(allowed=False, rule=rule, reason=reason, field=field)


def rows_allowed(policy: DataPolicy, dataset: str, facts: SiteFacts) -> Decision:
    """Whether row-level output of ``dataset`` may leave this site, and if not which rule says so."""
    if facts.sovereign or facts.connectivity == "air_gapped":
        why = "sovereign" if facts.sovereign else "air-gapped"
        return Decision.refuse("rows.site", f"rows never leave a {why} site")
    rule = policy.datasets.get(dataset)
    if not policy.allow_rows or rule is None or not rule.allow_rows:
        return Decision.refuse("rows", f"the data policy does not let rows of {dataset!r} leave this site")
    return Decision.allow()


def evaluate(
    policy: DataPolicy,
    facts: SiteFacts,
    *,
    dataset: str,
    mode: Literal["aggregate", "rows"],
    columns: Mapping[str, set[str]],
    aggregates: list[tuple[str, str]],
    model: str | None,
) -> Decision:
    """Whether a query may run here, before it reads a row.

    ``columns`` maps a use (``filter``, ``group``, ``aggregate``, ``score``,
    ``rows``) to the source columns the query uses that way; ``aggregates``
    lists ``(field, operator)`` pairs.
    """
    rule = policy.datasets.get(dataset)
    if rule is None:
        return Decision.refuse("datasets", f"dataset {dataset!r} may not be queried at this site", "dataset")
    if rule.columns is not None:
        allowed = set(rule.columns)
        for use in ("filter", "group", "aggregate", "score", "rows"):
            denied = sorted(columns.get(use, set()) - allowed)
            if denied:
                return Decision.refuse("columns", f"column {denied[0]!r} of {dataset!r} may not be used "
                                       f"({use}) at this site", _field_of(use))
    if rule.group_columns is not None:
        denied = sorted(columns.get("group", set()) - set(rule.group_columns))
        if denied:
            return Decision.refuse("group_columns", f"column {denied[0]!r} of {dataset!r} may not be a group key "
                                   "at this site", "group_by")
    if mode == "rows":
        decision = rows_allowed(policy, dataset, facts)
        if not decision.allowed:
            return Decision.refuse(decision.rule or "rows", decision.reason, "mode")
        if rule.row_columns is not None:
            denied = sorted(columns.get("rows", set()) - set(rule.row_columns))
            if denied:
                return Decision.refuse("row_columns", f"column {denied[0]!r} of {dataset!r} may not leave this "
                                       "site as rows", "columns")
    allowed_ops = set(policy.aggregates)
    for where, op in aggregates:
        if op not in allowed_ops:
            return Decision.refuse("aggregates", f"aggregate {op!r} is not allowed at this site", where)
    if model is not None and policy.models is not None and model not in policy.models:
        return Decision.refuse("models", f"model {model!r} may not score data at this site", "score.model")
    return Decision.allow()


def _field_of(use: str) -> str:
    return {"filter": "filters", "group": "group_by", "aggregate": "aggregates", "score": "score.inputs",
            "rows": "columns"}[use]


@dataclass(frozen=True)
class Suppression:
    """What k-suppression removed from one site's result."""

    cells: int
    # Rows in the suppressed cells, or None when they total fewer than k (see the module doc).
    rows: int | None


def suppression_mask(cell_rows: list[int] | tuple[int, ...], k: int) -> tuple[list[bool], Suppression]:
    """Which cells to keep (those with at least ``k`` rows), and what was suppressed."""
    keep = [n >= k for n in cell_rows]
    dropped = [n for n, kept in zip(cell_rows, keep, strict=True) if not kept]
    total = sum(dropped)
    return keep, Suppression(cells=len(dropped), rows=total if total >= k or total == 0 else None)


def check_output_size(policy: DataPolicy, *, cells: int, size_bytes: int) -> Decision:
    if cells > policy.max_output_cells:
        return Decision.refuse("max_output_cells", f"the result has {cells} cells; this site lets at most "
                               f"{policy.max_output_cells} leave")
    if size_bytes > policy.max_output_bytes:
        return Decision.refuse("max_output_bytes", f"the result is {size_bytes} bytes; this site lets at most "
                               f"{policy.max_output_bytes} leave")
    return Decision.allow()


# -- the estate's data policy document ---------------------------------------------------------------------------


class DataPolicyRule(PolicyDocument):
    """The data policy of the sites ``where`` selects (the first rule that selects a site decides for it)."""

    name: str = Field(pattern=RULE_NAME_PATTERN)
    description: str = Field(default="", max_length=500)
    where: SiteSelector = Field(default_factory=SiteSelector)
    policy: DataPolicy


class DataPolicyDocument(PolicyDocument):
    """The ``data`` policy of the estate, as the control plane keeps it: one :class:`DataPolicy` per site.

    Rules select sites as placement rules do (regions, sites, jurisdictions,
    labels, clearance); the first rule, in document order, that selects a site
    gives its policy, and ``default`` applies where none does. The default
    default lets nothing be queried.
    """

    kind: Literal["data"] = "data"
    default: DataPolicy = Field(default_factory=DataPolicy)
    rules: Annotated[list[DataPolicyRule], AfterValidator(unique_rule_names)] = Field(
        default_factory=list, max_length=200)

    def for_site(self, site: PlacementSiteFacts) -> tuple[str, DataPolicy]:
        """The name of the rule that decides for ``site`` ("default" when none selects it) and its policy."""
        for rule in self.rules:
            if rule.where.matches(site):
                return rule.name, rule.policy
        return "default", self.default
