from __future__ import annotations

from django.apps import AppConfig


class DemoConfig(AppConfig):
    # No models: the app holds the ``demo`` management command and its set-up.
    name = "demo"
    verbose_name = "Demo"
