"""The one policy evaluator, used by the control plane to plan and by every
node to enforce.

* :mod:`edge_runtime.policy.placement`: which model classification may run at
  which site (clearance, jurisdiction) and on which hardware;
* :mod:`edge_runtime.policy.rollout`: approvals, waves and health gates;
* :mod:`edge_runtime.policy.data`: which datasets, columns and aggregates may
  leave a site, the minimum group size, whether rows may leave at all.

Policies are plain data (validated pydantic models) so that the same bundle
is signed into a node's desired state and evaluated identically on both sides.
"""

from __future__ import annotations
