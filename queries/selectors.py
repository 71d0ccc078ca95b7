"""Reads of the catalog, of queries, and the data part of a node's desired state."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from django.db.models import QuerySet

from core.permissions import may_anywhere
from queries.models import DatasetSchema, FederatedQuery, QueryEvent, QuerySite
from sites.models import Site

# -- the catalog --------------------------------------------------------------------------------------------------


@dataclass
class CatalogEntry:
    """One dataset across the sites a person may query: where it is and the columns it has there."""

    name: str
    sites: list[str] = field(default_factory=list)
    rows: int = 0
    # Column name -> logical type; a column whose type differs between sites is "mixed" (usable nowhere).
    columns: dict[str, str] = field(default_factory=dict)
    time_column: str | None = None
    description: str = ""

    @property
    def column_list(self) -> list[tuple[str, str]]:
        return sorted(self.columns.items())

    @property
    def numeric_columns(self) -> list[str]:
        return sorted(c for c, t in self.columns.items() if t in ("int", "float", "bool"))

    @property
    def timestamp_columns(self) -> list[str]:
        return sorted(c for c, t in self.columns.items() if t == "timestamp")


def queryable_sites(user: Any) -> QuerySet[Site]:
    return Site.objects.select_related("region").restrict(user, "query")


def may_query_somewhere(user: Any) -> bool:
    return may_anywhere(user, "query")


def catalog_for_user(user: Any) -> dict[str, CatalogEntry]:
    """The datasets reported by active nodes at the sites ``user`` may query, by name."""
    site_ids = queryable_sites(user).values("pk")
    rows = (DatasetSchema.objects.filter(node__site__in=site_ids, node__revoked_at__isnull=True, error="")
            .select_related("node__site").order_by("name", "node__site__slug"))
    catalog: dict[str, CatalogEntry] = {}
    for row in rows:
        entry = catalog.setdefault(row.name, CatalogEntry(name=row.name))
        slug = row.node.site.slug
        if slug not in entry.sites:
            entry.sites.append(slug)
            entry.rows += row.row_count
        for column in row.columns:
            seen = entry.columns.get(column["name"])
            entry.columns[column["name"]] = column["type"] if seen in (None, column["type"]) else "mixed"
        entry.time_column = entry.time_column or row.schema.get("time_column")
        entry.description = entry.description or row.schema.get("description") or ""
    return catalog


def catalog_for_node(node: Any) -> QuerySet[DatasetSchema]:
    return DatasetSchema.objects.filter(node=node).order_by("name")


# -- queries ------------------------------------------------------------------------------------------------------


def query_list(*, user: Any) -> QuerySet[FederatedQuery]:
    """The queries ``user`` made (every query for an estate-wide administrator: the model's declared scope)."""
    return FederatedQuery.objects.select_related("created_by").order_by("-created_at").restrict(user)


def query_get(*, user: Any, query_uuid: uuid.UUID | str) -> FederatedQuery | None:
    return query_list(user=user).filter(uuid=query_uuid).first()


def query_sites(query: FederatedQuery) -> list[QuerySite]:
    return list(QuerySite.objects.filter(query=query).select_related("site__region", "node").order_by("site__name"))


def query_events(query: FederatedQuery) -> QuerySet[QueryEvent]:
    return QueryEvent.objects.filter(query=query).select_related("site").order_by("at", "pk")
