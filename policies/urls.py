from __future__ import annotations

from django.urls import path

from policies import views

app_name = "policies"

urlpatterns = [
    path("", views.policy_list, name="policy-list"),
    path("<str:kind>/", views.policy_detail, name="policy-detail"),
]
