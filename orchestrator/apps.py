from __future__ import annotations

import logging
import sys

from django.apps import AppConfig
from django.conf import settings

logger = logging.getLogger("edgewise")


class OrchestratorConfig(AppConfig):
    name = "orchestrator"
    verbose_name = "Orchestration"

    def ready(self) -> None:
        settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
        # WhiteNoise warns when STATIC_ROOT is missing even though it serves
        # from the finders until collectstatic has run.
        settings.STATIC_ROOT.mkdir(parents=True, exist_ok=True)
        if settings.EMBEDDED and "pytest" not in sys.modules:
            # Say it plainly: an operator must know that this is not a
            # production setup (SQLite, in-process channel layer).
            logger.warning(
                "Edgewise runs EMBEDDED: SQLite at %s, an in-process channel layer and a "
                "filesystem Celery broker. Set DATABASE_URL and REDIS_URL for production.",
                settings.DATABASES["default"]["NAME"],
            )
