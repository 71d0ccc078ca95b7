from __future__ import annotations

from django.urls import path

from sites import bundle_views, views

app_name = "sites"

urlpatterns = [
    path("", views.fleet, name="fleet"),
    path("map/", views.fleet_map, name="fleet-map"),
    path("map/sites.json", views.fleet_map_data, name="fleet-map-data"),
    path("sites/<slug:slug>/", views.site_detail, name="site-detail"),
    path("sites/<slug:slug>/tokens", views.token_create, name="token-create"),
    path("sites/<slug:slug>/tokens/<uuid:token_id>/revoke", views.token_revoke, name="token-revoke"),
    path("sites/<slug:slug>/installer", views.installer_download, name="site-installer"),
    path("sites/<slug:slug>/bundles/in", bundle_views.bundle_in_make, name="bundle-in-make"),
    path("sites/<slug:slug>/bundles/out", bundle_views.bundle_out_upload, name="bundle-out-upload"),
    path("nodes/<uuid:node_id>/", views.node_detail, name="node-detail"),
    path("nodes/<uuid:node_id>/revoke", views.node_revoke, name="node-revoke"),
    path("nodes/<uuid:node_id>/identity/accept", views.node_identity_accept, name="node-identity-accept"),
]
