from __future__ import annotations

from django.urls import path

from policies import people_views as views

app_name = "people"

urlpatterns = [
    path("", views.people_list, name="people-list"),
    path("new", views.person_create, name="person-create"),
    path("<int:user_id>/", views.person_detail, name="person-detail"),
    path("<int:user_id>/update", views.person_update, name="person-update"),
    path("<int:user_id>/grants/add", views.person_grant, {"change": "add"}, name="grant-add"),
    path("<int:user_id>/grants/remove", views.person_grant, {"change": "remove"}, name="grant-remove"),
]
