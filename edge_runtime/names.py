"""Names that must be unique within one document: rules of a policy, datasets of a catalog, columns of a query."""

from __future__ import annotations

from collections.abc import Iterable


def first_repeat(names: Iterable[str]) -> tuple[int, str] | None:
    """The index and name of the first name an earlier one already uses; None when all differ."""
    seen: set[str] = set()
    for index, name in enumerate(names):
        if name in seen:
            return index, name
        seen.add(name)
    return None
