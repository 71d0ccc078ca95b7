"""Small typed readers for environment variables that fail loudly on bad values."""

from __future__ import annotations

import os
import secrets
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlparse

from django.core.exceptions import ImproperlyConfigured

N = TypeVar("N", int, float)


class ConfigError(ImproperlyConfigured):
    """A variable with a value the control plane cannot start with; the message names it."""


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_secret(name: str, default: str = "") -> str:
    """``name``'s value, or the contents of the file that ``name_FILE`` names.

    The file form keeps secrets out of the environment (which ``ps e``, crash
    reports and child processes see) and fits Docker and Kubernetes secrets,
    which arrive as files. One trailing newline (what ``echo`` and editors
    add) is not part of the value. An empty variable counts as unset.
    """
    file_var = f"{name}_FILE"
    raw = os.environ.get(name, "")
    path = os.environ.get(file_var, "")
    if raw and path:
        raise ConfigError(f"{name} and {file_var} are both set; set only one of them")
    if not path:
        return raw or default
    return _secret_file_read(Path(path), what=f"{file_var}={path!r}")


def _secret_file_read(path: Path, *, what: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{what}: no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} cannot be read: {exc}") from exc
    value = text.removesuffix("\n").removesuffix("\r")
    if not value.strip():
        raise ConfigError(f"{what} is empty")
    return value


def secret_key_ensure(path: Path) -> str:
    """The secret key kept in ``path``; a new random one, written there owner-only (0600), if there is none.

    For installs that set no key and are not production (embedded, DEBUG):
    the key is this install's own, never a built-in one, and stays the same
    from run to run, so sessions survive a restart. Safe when several
    processes start at once: the key is written whole to a temporary file and
    then linked into place, which fails if another process got there first;
    every process then reads the one key that won.
    """
    what = f"the generated secret key {str(path)!r}"
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".secret-key-")  # mkstemp makes it 0600
        except OSError as exc:
            raise ConfigError(f"{what} cannot be created ({exc}); set EDGEWISE_SECRET_KEY or "
                              "EDGEWISE_SECRET_KEY_FILE") from exc
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                # 67 characters from a 400-bit random value: past Django's 50-character minimum.
                fh.write(secrets.token_urlsafe(50) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process created it first: its key is the key
            except OSError as exc:
                raise ConfigError(f"{what} cannot be created ({exc}); set EDGEWISE_SECRET_KEY or "
                                  "EDGEWISE_SECRET_KEY_FILE") from exc
            else:
                # Said once, by the process that made it: where the key is, and how to set one instead.
                print(f"edgewise: generated a secret key in {path} (kept for later runs; set EDGEWISE_SECRET_KEY "
                      "or EDGEWISE_SECRET_KEY_FILE to use your own)", file=sys.stderr)
        finally:
            os.unlink(tmp)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise ConfigError(f"{what} cannot be read: {exc}") from exc
    if mode & 0o077:
        # Whoever else could read it could forge sessions and signed values.
        raise ConfigError(f"{what} is readable by others (mode {mode:04o}); chmod 600 it, "
                          "or delete it to get a new key (every session ends)")
    return _secret_file_read(path, what=what)


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use true/false)")


def env_float(name: str, default: float) -> float:
    return _env_number(name, default, float, kind="a number", valid=lambda value: value > 0,
                       must="must be positive")


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    return _env_number(name, default, int, kind="a whole number", valid=lambda value: value >= minimum,
                       must=f"must be at least {minimum}")


def _env_number(name: str, default: N, parse: Callable[[str], N], *, kind: str, valid: Callable[[N], bool],
                must: str) -> N:
    """``name`` parsed by ``parse`` (``default`` when unset or empty); ConfigError naming it if it does not
    parse or is not ``valid``."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not {kind}") from exc
    if not valid(value):
        raise ConfigError(f"{name}={raw!r} {must}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def database_from_url(url: str) -> dict[str, object]:
    """Turn ``postgres://user:pass@host:port/name`` into a Django DATABASES entry."""
    parsed = urlparse(url)
    if parsed.scheme not in {"postgres", "postgresql", "pgsql"}:
        raise ConfigError(f"DATABASE_URL scheme {parsed.scheme!r} is not supported (use postgres://)")
    name = unquote(parsed.path.lstrip("/"))
    if not name:
        raise ConfigError("DATABASE_URL names no database")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": name,
        "USER": unquote(parsed.username or ""),
        "PASSWORD": unquote(parsed.password or ""),
        "HOST": parsed.hostname or "",
        "PORT": str(parsed.port or ""),
        "CONN_MAX_AGE": 0,
    }


def env_header(name: str) -> str:
    """An HTTP header name (``X-Forwarded-Proto``) as Django's ``request.META`` spells it
    (``HTTP_X_FORWARDED_PROTO``); empty when unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return ""
    if not all(c.isascii() and (c.isalnum() or c == "-") for c in raw):
        raise ConfigError(f"{name}={raw!r} is not an HTTP header name (e.g. X-Forwarded-Proto)")
    return "HTTP_" + raw.upper().replace("-", "_")
