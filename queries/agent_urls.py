from __future__ import annotations

from django.urls import path

from queries import agent_api

app_name = "agent-queries"

urlpatterns = [
    path("nodes/<uuid:node_id>/queries/<str:query_id>/result", agent_api.query_result, name="query-result"),
]
