"""The policies' part in every node's desired state (see ``orchestrator.features``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.features import NodeFeatureBase
from policies.selectors import data_bundle_for_site, policy_bundle_for_site


class PolicyFeature(NodeFeatureBase):
    """``policy``: the site's signed policy bundle (its facts, the placement and the data policy in force)."""

    name = "policy"

    def desired(self, node: Any, cache: dict[Any, Any]) -> Mapping[str, Any]:
        site = node.site
        key = ("policy", site.pk)
        if key not in cache:
            # "data": the data policy in force at the site and the facts it is evaluated with; "bundles": what
            # its nodes do with a bundle in that has expired (edge_runtime.airgap).
            cache[key] = {**policy_bundle_for_site(site), "data": data_bundle_for_site(site),
                          "bundles": {"expired": site.expired_bundles}}
        return {"policy": cache[key]}
