from __future__ import annotations

from django.urls import path

from queries import views

app_name = "queries"

urlpatterns = [
    path("", views.query_list, name="query-list"),
    path("new", views.query_new, name="query-new"),
    path("<uuid:query_id>/", views.query_detail, name="query-detail"),
    path("<uuid:query_id>/result.csv", views.query_csv, name="query-csv"),
]
