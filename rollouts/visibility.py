"""What of a rollout one user may see: the nodes and sites of the regions and sites they may view.

A rollout is visible to whoever may view at least one site it touches
(``Rollout.scope``); its page then shows only those sites' nodes, events and
exclusions, counts progress over them, and writes "a node you may not see"
for the ``site/node`` names of other sites that appear in the rollout's own
texts (its reason, its gate, its events).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

from rollouts.models import Rollout
from sites.models import Site

HIDDEN_NODE = "(a node you may not see)"


@dataclasses.dataclass(frozen=True)
class RolloutView:
    """The sites of one rollout that one user may and may not see."""

    visible_ids: frozenset[int]
    visible_slugs: frozenset[str]
    hidden_slugs: frozenset[str]

    @property
    def sees_all(self) -> bool:
        return not self.hidden_slugs

    def shows_site(self, slug: str) -> bool:
        return slug in self.visible_slugs

    def text(self, value: str) -> str:
        """``value`` with the node names of hidden sites (``site/node``) replaced."""
        if self.sees_all or not value:
            return value
        names = "|".join(re.escape(s) for s in sorted(self.hidden_slugs, key=len, reverse=True))
        return re.sub(rf"(?<![\w.-])(?:{names})/[\w.-]+", HIDDEN_NODE, value)

    def excluded(self, entries: Iterable[dict[str, str]]) -> list[dict[str, str]]:
        return [e for e in entries if self.shows_site(str(e.get("name", "")).partition("/")[0])]

    def gate(self, gate: dict[str, Any] | None) -> dict[str, Any] | None:
        if gate is None or self.sees_all:
            return gate
        checks = [{**c, "detail": self.text(str(c.get("detail") or ""))} for c in gate.get("checks") or []]
        return {**gate, "reason": self.text(str(gate.get("reason") or "")), "checks": checks}


def rollout_view(user: Any, rollout: Rollout) -> RolloutView:
    """Which of the sites ``rollout`` names (its sites, its target's, its exclusions') ``user`` may view."""
    named = {s.slug for s in rollout.sites.all()} | set(rollout.target.get("sites") or [])
    named |= {str(e.get("name", "")).partition("/")[0] for e in rollout.plan.get("excluded") or []}
    named.discard("")
    visible = dict(Site.objects.filter(slug__in=named).restrict(user).values_list("slug", "pk"))
    return RolloutView(visible_ids=frozenset(visible.values()), visible_slugs=frozenset(visible),
                       hidden_slugs=frozenset(named - visible.keys()))
