from __future__ import annotations

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from policies.auth import ConsoleLoginView

urlpatterns = [
    path("login/", ConsoleLoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("agent/v1/", include("sites.agent_urls")),
    path("agent/v1/", include("models_registry.agent_urls")),
    path("agent/v1/", include("queries.agent_urls")),
    path("audit/", include("audit.urls")),
    path("models/", include("models_registry.urls")),
    path("policies/", include("policies.urls")),
    path("people/", include("policies.people_urls")),
    path("queries/", include("queries.urls")),
    path("", include("metrics.urls")),
    path("", include("rollouts.urls")),
    path("", include("sites.urls")),
]
