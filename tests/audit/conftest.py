"""Fixtures of the audit log's tests: a log key and an anchor dir of the test's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def audit_dirs(settings: Any, tmp_path: Path) -> Path:
    """The log key and the anchor dir under ``tmp_path`` (the run's shared data dir would mix tests' anchors)."""
    settings.AUDIT_KEY_PATH = tmp_path / "audit_log_key.pem"
    settings.AUDIT_ANCHOR_DIR = tmp_path / "anchors"
    return tmp_path
