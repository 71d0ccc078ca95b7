from __future__ import annotations

from django.urls import path

from sites import views

app_name = "sites"

urlpatterns = [
    path("", views.fleet, name="fleet"),
]
