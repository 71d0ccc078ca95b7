"""Merkle trees kept in the database: any log's subtree hashes, read in one query, written once."""

from __future__ import annotations

import functools
import operator
from collections import defaultdict
from collections.abc import Iterable

from django.db.models import Q

from audit.log_models import TreeNode
from edge_runtime import merkle


class TreeStore:
    """The :class:`edge_runtime.merkle.Tree` of one log (the control plane's, or one node's)."""

    def __init__(self, log: str) -> None:
        self.log = log

    def nodes(self, keys: Iterable[merkle.Key]) -> dict[merkle.Key, bytes]:
        by_level: dict[int, list[int]] = defaultdict(list)
        for level, index in keys:
            by_level[level].append(index)
        if not by_level:
            return {}
        wanted = functools.reduce(operator.or_, (Q(level=level, index__in=indexes)
                                                 for level, indexes in by_level.items()))
        rows = TreeNode.objects.filter(wanted, log=self.log).values_list("level", "index", "hash")
        return {(level, index): bytes(digest) for level, index, digest in rows}

    def add(self, completed: Iterable[tuple[merkle.Key, bytes]]) -> None:
        """Keep the subtrees an append completed (:meth:`edge_runtime.merkle.Frontier.append`)."""
        TreeNode.objects.bulk_create(
            [TreeNode(log=self.log, level=level, index=index, hash=digest)
             for (level, index), digest in completed], batch_size=2000)

    def frontier(self, size: int) -> merkle.Frontier:
        """The frontier of the first ``size`` leaves, from the stored subtrees."""
        keys = merkle.cover(0, size) if size else []
        found = self.nodes(keys)
        try:
            return merkle.Frontier(size, [found[key] for key in keys])
        except KeyError as exc:
            raise LookupError(f"the log {self.log} lacks its subtree {exc.args[0]} (level, index)") from None
