from __future__ import annotations

from django.urls import path

from models_registry import agent_api

app_name = "registry-agent"

urlpatterns = [
    path("nodes/<uuid:node_id>/artifacts/<str:sha256>", agent_api.artifact, name="node-artifact"),
]
