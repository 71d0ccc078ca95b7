from __future__ import annotations

from django.urls import path

from sites import agent_api

app_name = "agent"

urlpatterns = [
    path("enroll", agent_api.enroll, name="enroll"),
    path("health", agent_api.health, name="health"),
    path("nodes/<uuid:node_id>/sync", agent_api.sync, name="node-sync"),
    path("nodes/<uuid:node_id>/desired-state", agent_api.desired_state, name="node-desired-state"),
]
