"""The Edgewise control plane: Django project, Celery app and orchestration."""

from __future__ import annotations

from orchestrator.celery import app as celery_app

__all__ = ["celery_app"]
