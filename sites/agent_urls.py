from __future__ import annotations

from django.urls import path

from sites import agent_api, distribution

app_name = "agent"

urlpatterns = [
    path("enroll", agent_api.enroll, name="enroll"),
    path("health", agent_api.health, name="health"),
    path("nodes/<uuid:node_id>/sync", agent_api.sync, name="node-sync"),
    path("nodes/<uuid:node_id>/desired-state", agent_api.desired_state, name="node-desired-state"),
]

# The edge runtime's distribution (public: a wheel is code, not a secret).
urlpatterns += [
    path("dist/", distribution.dist_index, name="dist-index"),
    path("dist/<str:filename>", distribution.dist_file, name="dist-file"),
    # Proof of the signing key, checked by installers before they spend a token.
    path("signing-key", distribution.signing_key, name="signing-key"),
]
