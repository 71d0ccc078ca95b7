from __future__ import annotations

from django.urls import path

from metrics import views

app_name = "metrics"

# Prometheus's default metrics_path: a scrape config needs no path of its own.
urlpatterns = [path("metrics", views.metrics_scrape, name="metrics-scrape")]
