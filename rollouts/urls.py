from __future__ import annotations

from django.urls import path

from rollouts import views

app_name = "rollouts"

urlpatterns = [
    path("rollouts/", views.rollout_list, name="rollout-list"),
    path("rollouts/new", views.rollout_create, name="rollout-create"),
    path("rollouts/<uuid:rollout_id>/", views.rollout_detail, name="rollout-detail"),
    path("rollouts/<uuid:rollout_id>/<str:decision>/decide", views.rollout_decide, name="rollout-decide"),
    path("rollouts/<uuid:rollout_id>/<str:action>", views.rollout_action, name="rollout-action"),
    path("approvals/", views.approval_list, name="approval-list"),
    path("rollouts/deploy/<str:slug>", views.deploy, name="deploy"),
]
