"""Settings come from the environment, fail loudly on bad values, and default to embedded mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.env import ConfigError, database_from_url, env_bool, env_float, env_list

REPO = Path(__file__).resolve().parents[2]

# Printed by a fresh interpreter that imports the settings as a process would.
PROBE = """
import json, django
django.setup()
from django.conf import settings as s
print(json.dumps({
    "embedded": s.EMBEDDED,
    "engine": s.DATABASES["default"]["ENGINE"],
    "name": str(s.DATABASES["default"]["NAME"]),
    "host": s.DATABASES["default"].get("HOST", ""),
    "layer": s.CHANNEL_LAYERS["default"]["BACKEND"],
    "layer_hosts": s.CHANNEL_LAYERS["default"].get("CONFIG", {}).get("hosts", []),
    "broker": s.CELERY_BROKER_URL,
    "data_dir": str(s.DATA_DIR),
}))
"""


def run_settings(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in {"DATABASE_URL", "REDIS_URL"} and not k.startswith("EDGEWISE_")}
    clean.update({"DJANGO_SETTINGS_MODULE": "orchestrator.settings", "EDGEWISE_DATA_DIR": str(tmp_path)})
    clean.update(env)
    return subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=clean, capture_output=True, text=True,
                          timeout=60, check=False)


def probe(tmp_path: Path, **env: str) -> tuple[dict[str, Any], str]:
    result = run_settings(tmp_path, **env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


# -- the helpers -------------------------------------------------------------


@pytest.mark.parametrize("raw,expected", [("true", True), ("YES", True), ("1", True), ("off", False), ("0", False)])
def test_it_reads_booleans(monkeypatch: pytest.MonkeyPatch, raw: str, expected: bool) -> None:
    monkeypatch.setenv("EDGEWISE_X", raw)
    assert env_bool("EDGEWISE_X", not expected) is expected


def test_it_uses_the_default_for_an_unset_or_empty_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEWISE_X", raising=False)
    assert env_bool("EDGEWISE_X", True) is True
    assert env_float("EDGEWISE_X", 2.5) == 2.5
    monkeypatch.setenv("EDGEWISE_X", "")
    assert env_bool("EDGEWISE_X", False) is False
    assert env_list("EDGEWISE_X", ["a"]) == ["a"]


def test_it_refuses_a_boolean_it_cannot_read_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEWISE_DEBUG", "maybe")
    with pytest.raises(ConfigError, match=r"EDGEWISE_DEBUG='maybe' is not a boolean"):
        env_bool("EDGEWISE_DEBUG")


@pytest.mark.parametrize("raw,reason", [
    ("ten", "is not a number"), ("-1", "must be positive"), ("0", "must be positive"),
])
def test_it_refuses_a_bad_number_naming_the_variable(monkeypatch: pytest.MonkeyPatch, raw: str, reason: str) -> None:
    monkeypatch.setenv("EDGEWISE_SYNC_INTERVAL", raw)
    with pytest.raises(ConfigError, match=rf"EDGEWISE_SYNC_INTERVAL='{raw}' {reason}"):
        env_float("EDGEWISE_SYNC_INTERVAL", 10.0)


def test_it_splits_lists_on_commas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEWISE_ALLOWED_HOSTS", " a.example.org, ,b.example.org ")
    assert env_list("EDGEWISE_ALLOWED_HOSTS", []) == ["a.example.org", "b.example.org"]


@pytest.mark.parametrize("url", ["mysql://root@localhost/edgewise", "sqlite:///tmp/x.db", "edgewise"])
def test_it_refuses_a_database_url_that_is_not_postgres(url: str) -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL scheme .* is not supported"):
        database_from_url(url)


def test_it_refuses_a_database_url_without_a_database_name() -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL names no database"):
        database_from_url("postgres://postgres@127.0.0.1:5432/")


def test_it_reads_every_part_of_a_database_url() -> None:
    db = database_from_url("postgresql://edge%40ops:p%2Fss@db.example.org:6543/fleet")
    assert db["ENGINE"] == "django.db.backends.postgresql"
    assert (db["USER"], db["PASSWORD"], db["HOST"], db["PORT"], db["NAME"]) == (
        "edge@ops", "p/ss", "db.example.org", "6543", "fleet")


# -- the settings module, as a process sees it --------------------------------


def test_it_runs_embedded_with_neither_url_and_says_so(tmp_path: Path) -> None:
    seen, stderr = probe(tmp_path)
    assert seen["embedded"] is True
    assert seen["engine"] == "django.db.backends.sqlite3"
    assert seen["name"] == str(tmp_path / "edgewise.sqlite3")
    assert seen["layer"] == "channels.layers.InMemoryChannelLayer"
    assert seen["broker"] == "filesystem://"
    assert "EMBEDDED" in stderr and "DATABASE_URL" in stderr


def test_it_uses_postgres_and_redis_when_both_urls_are_set(tmp_path: Path) -> None:
    seen, stderr = probe(tmp_path, DATABASE_URL="postgres://edge@db.example.org:5432/fleet",
                         REDIS_URL="redis://cache.example.org:6379/2")
    assert seen["embedded"] is False
    assert (seen["engine"], seen["name"], seen["host"]) == ("django.db.backends.postgresql", "fleet", "db.example.org")
    assert seen["layer"] == "channels_redis.core.RedisChannelLayer"
    (host,) = seen["layer_hosts"]
    assert host["address"] == "redis://cache.example.org:6379/2"
    # Above channels_redis's 5 s blocking pop, so an idle wait never times out on the socket.
    assert host["socket_timeout"] > 5
    assert seen["broker"] == "redis://cache.example.org:6379/2"
    assert "EMBEDDED" not in stderr


@pytest.mark.parametrize("env,named", [
    ({"EDGEWISE_DEBUG": "sometimes"}, "EDGEWISE_DEBUG"),
    ({"EDGEWISE_SYNC_INTERVAL": "fast"}, "EDGEWISE_SYNC_INTERVAL"),
    ({"DATABASE_URL": "mysql://root@localhost/edgewise"}, "DATABASE_URL"),
    ({"EDGEWISE_NODE_STALE_AFTER": "60", "EDGEWISE_NODE_OFFLINE_AFTER": "30"}, "EDGEWISE_NODE_OFFLINE_AFTER"),
])
def test_it_refuses_to_start_with_a_bad_value_naming_it(tmp_path: Path, env: dict[str, str], named: str) -> None:
    result = run_settings(tmp_path, **env)
    assert result.returncode != 0
    assert "ConfigError" in result.stderr and named in result.stderr
