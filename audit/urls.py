from __future__ import annotations

from django.urls import path

from audit import views

app_name = "audit"

urlpatterns = [
    path("", views.event_list, name="event-list"),
    path("checkpoint", views.checkpoint, name="checkpoint"),
    path("vkey", views.vkey, name="vkey"),
    path("export", views.export, name="export"),
    path("<uuid:event_id>/", views.event_detail, name="event-detail"),
    path("<uuid:event_id>/proof", views.event_proof, name="event-proof"),
    path("nodes/<uuid:node_id>/<int:seq>/", views.node_entry_detail, name="node-entry"),
    path("nodes/<uuid:node_id>/<int:seq>/proof", views.node_entry_proof, name="node-entry-proof"),
]
