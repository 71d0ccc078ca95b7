from __future__ import annotations

from django.urls import path

from models_registry import views

app_name = "models_registry"

urlpatterns = [
    path("", views.model_list, name="model-list"),
    path("new", views.model_create, name="model-create"),
    path("<str:slug>/", views.model_detail, name="model-detail"),
    path("<str:slug>/versions", views.version_upload, name="version-upload"),
    path("<str:slug>/deployments/<uuid:deployment_id>/remove", views.deployment_remove, name="deployment-remove"),
]
