from __future__ import annotations

from django.apps import AppConfig


class ModelsRegistryConfig(AppConfig):
    name = "models_registry"
    verbose_name = "Model registry"

    def ready(self) -> None:
        # The tasks register in every process, so the services enqueue them by name (eager runs too).
        from models_registry import tasks  # noqa: F401
        from models_registry.node_feature import ModelsFeature
        from orchestrator import features

        features.register(ModelsFeature())
