"""Settings come from the environment, fail loudly on bad values, and default to embedded mode."""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.env import (
    ConfigError,
    database_from_url,
    env_bool,
    env_float,
    env_header,
    env_list,
    env_secret,
    secret_key_ensure,
)

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
    "secret_key": s.SECRET_KEY,
    "allowed_hosts": s.ALLOWED_HOSTS,
    "ssl_redirect": s.SECURE_SSL_REDIRECT,
    "cookies_secure": [s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE],
    "hsts": [s.SECURE_HSTS_SECONDS, s.SECURE_HSTS_INCLUDE_SUBDOMAINS, s.SECURE_HSTS_PRELOAD],
    "proxy_ssl_header": s.SECURE_PROXY_SSL_HEADER,
}))
"""

# Plain HTTP requests through the whole middleware stack: what a node and a
# browser get when they dial http://.
REQUESTS = """
import json, django
django.setup()
from django.test import Client
client = Client(HTTP_HOST="edgewise.example.org")
print(json.dumps({path: [r.status_code, r.headers.get("Location", "")]
                  for path in ("/agent/v1/health", "/login/") for r in [client.get(path)]}))
"""

# Variables a developer's shell may hold that would change what a test sees.
_OUTSIDE = {"DATABASE_URL", "REDIS_URL", "DATABASE_URL_FILE", "REDIS_URL_FILE", "DJANGO_SETTINGS_MODULE"}


def settings_env(tmp_path: Path, **env: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in _OUTSIDE and not k.startswith("EDGEWISE_")}
    clean.update({"DJANGO_SETTINGS_MODULE": "orchestrator.settings", "EDGEWISE_DATA_DIR": str(tmp_path)})
    clean.update(env)
    return clean


def run_settings(tmp_path: Path, script: str = PROBE, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, env=settings_env(tmp_path, **env),
                          capture_output=True, text=True, timeout=60, check=False)


def probe(tmp_path: Path, script: str = PROBE, **env: str) -> tuple[dict[str, Any], str]:
    result = run_settings(tmp_path, script, **env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def secret_file(folder: Path, content: str, name: str = "secret") -> Path:
    path = folder / name
    path.write_text(content)
    path.chmod(0o600)
    return path


# What a production install behind TLS sets (README, Configuration), the key
# from a file as a secrets store hands it over.
def production_env(tmp_path: Path) -> dict[str, str]:
    return {
        "DATABASE_URL": "postgres://edgewise@db.example.org:5432/fleet",
        "REDIS_URL": "redis://cache.example.org:6379/0",
        "EDGEWISE_SECRET_KEY_FILE": str(secret_file(tmp_path, secrets.token_urlsafe(50) + "\n", "key")),
        "EDGEWISE_PUBLIC_URL": "https://edgewise.example.org",
        "EDGEWISE_HSTS_SECONDS": "31536000",
        "EDGEWISE_HSTS_INCLUDE_SUBDOMAINS": "true",
        "EDGEWISE_HSTS_PRELOAD": "true",
    }


A_KEY = secrets.token_urlsafe(50)


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
                         REDIS_URL="redis://cache.example.org:6379/2", EDGEWISE_SECRET_KEY=A_KEY)
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
    ({"EDGEWISE_PUBLIC_URL": "edgewise.example.org"}, "EDGEWISE_PUBLIC_URL"),
    ({"EDGEWISE_HSTS_SECONDS": "a year"}, "EDGEWISE_HSTS_SECONDS"),
    ({"EDGEWISE_HSTS_PRELOAD": "true", "EDGEWISE_HSTS_SECONDS": "31536000"}, "EDGEWISE_HSTS_INCLUDE_SUBDOMAINS"),
    ({"EDGEWISE_SECURE_COOKIES": "always"}, "EDGEWISE_SECURE_COOKIES"),
    ({"EDGEWISE_SECURE_PROXY_SSL_HEADER": "X-Forwarded-Proto: https"}, "EDGEWISE_SECURE_PROXY_SSL_HEADER"),
    ({"EDGEWISE_CSRF_TRUSTED_ORIGINS": "console.example.org"}, "EDGEWISE_CSRF_TRUSTED_ORIGINS"),
])
def test_it_refuses_to_start_with_a_bad_value_naming_it(tmp_path: Path, env: dict[str, str], named: str) -> None:
    result = run_settings(tmp_path, EDGEWISE_SECRET_KEY=A_KEY, **env)
    assert result.returncode != 0
    assert "ConfigError" in result.stderr and named in result.stderr


# -- secrets -------------------------------------------------------------------


@pytest.mark.parametrize("env", [
    {"DATABASE_URL": "postgres://edge@db.example.org:5432/fleet"},
    {"REDIS_URL": "redis://cache.example.org:6379/0"},
    {"DATABASE_URL": "postgres://edge@db.example.org:5432/fleet", "REDIS_URL": "redis://cache.example.org:6379/0"},
])
def test_it_refuses_to_start_in_production_without_a_secret_key_naming_it(tmp_path: Path,
                                                                           env: dict[str, str]) -> None:
    result = run_settings(tmp_path, **env)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr or "ConfigError" in result.stderr
    assert "EDGEWISE_SECRET_KEY (or EDGEWISE_SECRET_KEY_FILE" in result.stderr
    # Nor did it make one up on the way.
    assert not (tmp_path / "secret_key").exists()


def test_it_generates_a_key_of_its_own_for_a_debug_install_with_postgres(tmp_path: Path) -> None:
    seen, _ = probe(tmp_path, EDGEWISE_DEBUG="true", DATABASE_URL="postgres://edge@db.example.org:5432/fleet")
    assert seen["secret_key"] == (tmp_path / "secret_key").read_text().removesuffix("\n")
    assert len(seen["secret_key"]) >= 50


def test_it_reads_the_secret_key_from_a_file_without_its_trailing_newline(tmp_path: Path) -> None:
    key = secrets.token_urlsafe(50)
    path = secret_file(tmp_path, key + "\n")
    seen, _ = probe(tmp_path, EDGEWISE_SECRET_KEY_FILE=str(path), DATABASE_URL="postgres://e@db.example.org/fleet")
    assert seen["secret_key"] == key


def test_it_reads_the_database_and_redis_urls_from_files(tmp_path: Path) -> None:
    db = secret_file(tmp_path, "postgres://edge:s3cret@db.example.org:5432/fleet\n", "db")
    redis = secret_file(tmp_path, "redis://:s3cret@cache.example.org:6379/2\n", "redis")
    seen, _ = probe(tmp_path, DATABASE_URL_FILE=str(db), REDIS_URL_FILE=str(redis), EDGEWISE_SECRET_KEY=A_KEY)
    assert seen["embedded"] is False
    assert (seen["engine"], seen["name"], seen["host"]) == ("django.db.backends.postgresql", "fleet", "db.example.org")
    assert seen["broker"] == "redis://:s3cret@cache.example.org:6379/2"
    assert seen["layer_hosts"][0]["address"] == "redis://:s3cret@cache.example.org:6379/2"


def test_it_strips_one_trailing_newline_from_a_secret_file_and_no_more(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEWISE_X", raising=False)
    for content, value in [("a b\n", "a b"), ("a b\r\n", "a b"), ("a b\n\n", "a b\n"), (" a b ", " a b ")]:
        monkeypatch.setenv("EDGEWISE_X_FILE", str(secret_file(tmp_path, content)))
        assert env_secret("EDGEWISE_X") == value


@pytest.mark.parametrize("name", ["EDGEWISE_SECRET_KEY", "DATABASE_URL", "REDIS_URL"])
def test_it_refuses_a_secret_set_both_directly_and_by_file_naming_both(tmp_path: Path, name: str) -> None:
    path = secret_file(tmp_path, "redis://cache.example.org/0" if name == "REDIS_URL" else "postgres://e@h/fleet")
    env = {"EDGEWISE_SECRET_KEY": A_KEY, name: "postgres://e@h/fleet", f"{name}_FILE": str(path)}
    result = run_settings(tmp_path, **env)
    assert result.returncode != 0
    assert f"{name} and {name}_FILE are both set" in result.stderr


@pytest.mark.parametrize("content,reason", [(None, "no such file"), ("", "is empty"), ("\n", "is empty")])
@pytest.mark.parametrize("name", ["EDGEWISE_SECRET_KEY", "DATABASE_URL"])
def test_it_refuses_a_missing_or_empty_secret_file_naming_the_variable_and_the_path(
        tmp_path: Path, name: str, content: str | None, reason: str) -> None:
    path = tmp_path / "secrets" / "value"
    if content is not None:
        path.parent.mkdir()
        secret_file(path.parent, content, "value")
    env = {f"{name}_FILE": str(path)}
    if name != "EDGEWISE_SECRET_KEY":
        env["EDGEWISE_SECRET_KEY"] = A_KEY
    result = run_settings(tmp_path, **env)
    assert result.returncode != 0
    assert f"{name}_FILE='{path}'" in result.stderr and reason in result.stderr


def test_it_refuses_a_secret_file_it_cannot_read_naming_the_variable_and_the_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A folder where the file should be: unreadable as a file for any user, root included.
    monkeypatch.setenv("EDGEWISE_X_FILE", str(tmp_path))
    monkeypatch.delenv("EDGEWISE_X", raising=False)
    with pytest.raises(ConfigError, match=rf"EDGEWISE_X_FILE='{tmp_path}' cannot be read"):
        env_secret("EDGEWISE_X")


def test_it_keeps_one_generated_key_owner_only_across_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    path = tmp_path / "var" / "secret_key"
    first = secret_key_ensure(path)
    assert len(first) >= 50
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Making it is said, with where it is; reusing it is not.
    assert f"generated a secret key in {path}" in capsys.readouterr().err
    assert secret_key_ensure(path) == first
    assert "generated" not in capsys.readouterr().err
    # Another install gets a key of its own: nothing built in.
    assert secret_key_ensure(tmp_path / "other" / "secret_key") != first


def test_it_refuses_a_generated_key_that_others_can_read(tmp_path: Path) -> None:
    path = tmp_path / "secret_key"
    secret_key_ensure(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"secret_key' is readable by others \(mode 0644\)"):
        secret_key_ensure(path)


def test_it_gives_processes_started_at_once_one_generated_key(tmp_path: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", PROBE], cwd=REPO, env=settings_env(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(4)]
    keys = {json.loads(proc.communicate(timeout=60)[0].strip().splitlines()[-1])["secret_key"] for proc in procs}
    assert keys == {(tmp_path / "secret_key").read_text().removesuffix("\n")}


def test_it_runs_embedded_with_a_generated_key_that_the_next_run_and_the_demo_children_reuse(tmp_path: Path) -> None:
    first, _ = probe(tmp_path)
    assert stat.S_IMODE((tmp_path / "secret_key").stat().st_mode) == 0o600
    assert first["secret_key"] == (tmp_path / "secret_key").read_text().removesuffix("\n")
    # The demo as it starts uvicorn and Celery: its children print the key their settings hold.
    script = f"""
import django, subprocess, sys
django.setup()
from django.conf import settings
from demo.management.commands.demo import Command
env = Command().child_env("http://127.0.0.1:8000")
child = subprocess.run([sys.executable, "-c", {PROBE!r}], env=env, capture_output=True, text=True, check=True)
print(child.stdout.strip().splitlines()[-1])
"""
    child, _ = probe(tmp_path, script)
    assert child["secret_key"] == first["secret_key"]


# -- HTTPS and check --deploy --------------------------------------------------


def test_it_turns_on_https_with_an_https_public_url(tmp_path: Path) -> None:
    seen, _ = probe(tmp_path, **production_env(tmp_path))
    assert seen["ssl_redirect"] is True
    assert seen["cookies_secure"] == [True, True]
    assert seen["hsts"] == [31536000, True, True]
    assert "edgewise.example.org" in seen["allowed_hosts"]
    # Trusting a forwarded header is the operator's call: behind no proxy, clients could forge it.
    assert seen["proxy_ssl_header"] is None


def test_it_changes_nothing_over_plain_http_unless_asked(tmp_path: Path) -> None:
    seen, _ = probe(tmp_path, EDGEWISE_PUBLIC_URL="http://10.0.0.5:8000")
    assert seen["ssl_redirect"] is False
    assert seen["cookies_secure"] == [False, False]
    assert seen["hsts"] == [0, False, False]
    answers, _ = probe(tmp_path, REQUESTS, EDGEWISE_PUBLIC_URL="http://edgewise.example.org")
    assert answers["/agent/v1/health"][0] == 200
    assert answers["/login/"][0] == 200


def test_it_redirects_browsers_but_not_nodes_that_dial_a_plain_http_public_url(tmp_path: Path) -> None:
    answers, _ = probe(tmp_path, REQUESTS, EDGEWISE_PUBLIC_URL="http://edgewise.example.org",
                       EDGEWISE_SECURE_SSL_REDIRECT="true")
    assert answers["/agent/v1/health"][0] == 200
    assert answers["/login/"] == [301, "https://edgewise.example.org/login/"]


def test_it_redirects_nodes_too_when_the_public_url_is_https(tmp_path: Path) -> None:
    answers, _ = probe(tmp_path, REQUESTS, EDGEWISE_PUBLIC_URL="https://edgewise.example.org")
    assert answers["/agent/v1/health"] == [301, "https://edgewise.example.org/agent/v1/health"]
    assert answers["/login/"] == [301, "https://edgewise.example.org/login/"]


def test_it_trusts_a_forwarded_proto_header_only_when_named(tmp_path: Path) -> None:
    seen, _ = probe(tmp_path, EDGEWISE_SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto")
    assert seen["proxy_ssl_header"] == ["HTTP_X_FORWARDED_PROTO", "https"]


def test_it_spells_a_header_as_django_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEWISE_X", " x-forwarded-proto ")
    assert env_header("EDGEWISE_X") == "HTTP_X_FORWARDED_PROTO"


def check_deploy(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"], cwd=REPO,
                          env=settings_env(tmp_path, **env), capture_output=True, text=True, timeout=120,
                          check=False)


def test_it_passes_check_deploy_with_no_warning_in_production(tmp_path: Path) -> None:
    result = check_deploy(tmp_path, **production_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues (0 silenced)." in result.stdout
    assert "WARNING" not in result.stdout + result.stderr


def test_it_fails_check_deploy_without_a_secret_key_naming_it(tmp_path: Path) -> None:
    env = production_env(tmp_path)
    del env["EDGEWISE_SECRET_KEY_FILE"]
    result = check_deploy(tmp_path, **env)
    assert result.returncode != 0
    assert "EDGEWISE_SECRET_KEY (or EDGEWISE_SECRET_KEY_FILE" in result.stderr


def test_it_fails_check_deploy_on_a_warning(tmp_path: Path) -> None:
    # Without HSTS a production install is one warning short: CI must fail on it, not pass it by.
    env = production_env(tmp_path)
    for name in ("EDGEWISE_HSTS_SECONDS", "EDGEWISE_HSTS_INCLUDE_SUBDOMAINS", "EDGEWISE_HSTS_PRELOAD"):
        del env[name]
    result = check_deploy(tmp_path, **env)
    assert result.returncode != 0
    assert "security.W004" in result.stderr + result.stdout
