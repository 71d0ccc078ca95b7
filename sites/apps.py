from __future__ import annotations

from django.apps import AppConfig


class SitesConfig(AppConfig):
    name = "sites"
    verbose_name = "Regions, sites and nodes"
