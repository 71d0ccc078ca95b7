from __future__ import annotations

from django.apps import AppConfig


class RolloutsConfig(AppConfig):
    name = "rollouts"
    verbose_name = "Rollouts"

    def ready(self) -> None:
        from models_registry.selectors import assignment_source_register

        # The tasks register in every process, so the engine enqueues ticks by name (eager runs too).
        from rollouts import tasks  # noqa: F401
        from rollouts.selectors import rollout_assignments

        # A rollout's version reaches a node as an assignment that wins over earlier deployments.
        assignment_source_register(rollout_assignments)
