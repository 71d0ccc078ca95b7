"""Settings for the Edgewise control plane, driven by environment variables.

Production sets ``DATABASE_URL`` (PostgreSQL) and ``REDIS_URL`` (Celery broker,
Channels layer). With neither set, the control plane runs *embedded* on one
machine with only Python: SQLite, an in-process channel layer and Celery's
filesystem broker. It says so when it starts (see ``orchestrator.apps``).

Secrets: ``EDGEWISE_SECRET_KEY``, ``DATABASE_URL`` and ``REDIS_URL`` (both
URLs may carry a password) can instead come from a file, named by the same
variable with ``_FILE`` appended (``EDGEWISE_SECRET_KEY_FILE=/run/secrets/key``),
as Docker and Kubernetes secrets arrive; one trailing newline is dropped.
Setting both forms, or naming a file that is missing, unreadable or empty,
stops the process with an error naming the variable (and the file).

The secret key: production (``EDGEWISE_DEBUG`` off and ``DATABASE_URL`` or
``REDIS_URL`` set) refuses to start without one; there is no built-in key.
An embedded or DEBUG install without one generates a random key once, keeps
it in ``DATA_DIR/secret_key`` (mode 0600) and reuses it on every later run,
so the embedded ``manage.py demo`` needs no setup and its processes share
the key.

HTTPS: a production install behind TLS sets ``EDGEWISE_PUBLIC_URL`` to its
``https://`` URL, which turns on the HTTP→HTTPS redirect and Secure cookies
and allows that host, and decides on HSTS with ``EDGEWISE_HSTS_SECONDS``,
``EDGEWISE_HSTS_INCLUDE_SUBDOMAINS`` and ``EDGEWISE_HSTS_PRELOAD``; with
those, ``manage.py check --deploy`` reports nothing (CI checks it). Behind a
TLS-terminating proxy on another machine, also set
``EDGEWISE_SECURE_PROXY_SSL_HEADER``, or the redirect loops. With an
``http://`` public URL (nodes on a closed network without TLS), nothing
changes unless asked for, and even a redirect turned on leaves the agent
endpoints (``/agent/``) alone, so the nodes keep working.

Every variable:

==============================  ===============================================
``DATABASE_URL``                ``postgres://user:pass@host:5432/name``
                                (or ``DATABASE_URL_FILE``)
``REDIS_URL``                   ``redis://host:6379/0`` (or ``REDIS_URL_FILE``)
``EDGEWISE_DB_POOL_SIZE``       PostgreSQL connections each process keeps in
                                its pool, default 10; 0 turns pooling off
``EDGEWISE_SECRET_KEY``         Django secret key, 50+ random characters;
                                required in production, generated in
                                ``DATA_DIR/secret_key`` otherwise (see above)
``EDGEWISE_SECRET_KEY_FILE``    a file holding it, instead
``EDGEWISE_DEBUG``              true/false, default false
``EDGEWISE_ALLOWED_HOSTS``      comma separated, default ``localhost,127.0.0.1,[::1]``
                                and the host of ``EDGEWISE_PUBLIC_URL``
``EDGEWISE_CSRF_TRUSTED_ORIGINS``
                                comma separated origins
                                (``https://console.example.org``) allowed to
                                post forms besides the request's own, default
                                none
``EDGEWISE_SECURE_SSL_REDIRECT``
                                redirect plain HTTP to HTTPS, default true
                                when ``EDGEWISE_PUBLIC_URL`` is ``https://``;
                                never the agent endpoints when it is
                                ``http://``
``EDGEWISE_SECURE_COOKIES``     send session and CSRF cookies over HTTPS
                                only, default as the redirect
``EDGEWISE_HSTS_SECONDS``       HSTS max-age in seconds, default 0 (no HSTS);
                                a year is 31536000
``EDGEWISE_HSTS_INCLUDE_SUBDOMAINS``
                                HSTS for every subdomain too, default false
``EDGEWISE_HSTS_PRELOAD``       consent to browsers' HSTS preload lists,
                                default false; needs the two above
``EDGEWISE_SECURE_PROXY_SSL_HEADER``
                                the header, e.g. ``X-Forwarded-Proto``, by
                                which a TLS-terminating proxy says the request
                                came over HTTPS (value ``https``); default
                                none. Set it only behind such a proxy, which
                                must overwrite what clients send
``EDGEWISE_DATA_DIR``           where the embedded database, signing key and
                                artifacts live; default ``./var``
``EDGEWISE_SIGNING_KEY_PATH``   Ed25519 PEM; created by the first start of a
                                control plane that never signed; missing
                                after that, start-up fails naming it
``EDGEWISE_AUDIT_KEY_PATH``     Ed25519 PEM that signs the audit log's
                                checkpoints and cosigns the nodes' ones;
                                default ``DATA_DIR/audit_log_key.pem``
``EDGEWISE_AUDIT_ORIGIN``       the audit log's name in its checkpoints,
                                default ``<public host>/edgewise/audit``
``EDGEWISE_AUDIT_ANCHOR_DIR``   where signed checkpoints are also appended
                                (outside the database; put it on other
                                storage), default ``DATA_DIR/audit-anchors``
``EDGEWISE_AUDIT_CHECKPOINT_INTERVAL``
                                seconds between audit log checkpoints,
                                default 10
``EDGEWISE_AUDIT_CHECKPOINT_ENTRIES``
                                entries after which a checkpoint is taken
                                sooner, default 1000
``EDGEWISE_PUBLIC_URL``         the http(s) URL nodes dial (written into
                                installers); default: taken from the request
``EDGEWISE_WHEELHOUSE``         folder of extra ``.whl`` files (the edge
                                runtime's dependencies) served to sites at
                                ``/agent/v1/dist/`` for installs without a
                                package index; default ``DATA_DIR/wheelhouse``
``EDGEWISE_CELERY_QUEUE``       the Celery queue tasks go to, default ``edgewise``
``EDGEWISE_ARTIFACT_DIR``       content-addressed model artifacts, default
                                ``DATA_DIR/artifacts``
``EDGEWISE_MAX_MODEL_BYTES``    largest model file accepted, default 512 MiB
``EDGEWISE_BODY_TIMEOUT_S``     seconds a request body may send nothing before
                                it is answered 408, default 30
``EDGEWISE_MODEL_VALIDATION_TIMEOUT``
                                seconds a validation may run before the
                                reconciler presumes its worker lost and
                                queues it again, default 600
``EDGEWISE_MODEL_RECONCILE_INTERVAL``
                                seconds between runs of that reconciler,
                                default 60
``EDGEWISE_ROLLOUT_TICK``       seconds between the ticks that move a rollout
                                along (node reports, bake, gate), default 5
``EDGEWISE_ROLLOUT_STALL_AFTER``
                                seconds a rollout's next tick may be overdue
                                before the reconciler presumes its worker lost
                                and ticks it again, default 30
``EDGEWISE_ROLLOUT_RECONCILE_INTERVAL``
                                seconds between runs of that reconciler,
                                default 15
``EDGEWISE_SYNC_INTERVAL``      seconds between a node's syncs, default 10
``EDGEWISE_NODE_STALE_AFTER``   seconds without a sync before a node is
                                *stale*, default 3 sync intervals
``EDGEWISE_NODE_OFFLINE_AFTER`` seconds without a sync before it is
                                *offline*, default 12 sync intervals
``EDGEWISE_QUIET_SYNC``         answer syncs that report nothing new from
                                Redis (``orchestrator.quiet``), default on
``EDGEWISE_QUIET_SYNC_TTL``     seconds after a node's last full sync that it
                                may still be answered quietly, default 3600
``EDGEWISE_HEARTBEAT_FLUSH_INTERVAL``
                                seconds between writes of quiet syncs'
                                heartbeats to PostgreSQL, default 1
``EDGEWISE_NUDGE_REPORTS_PER_S``
                                whole syncs a second that the reports of a
                                pushed desired state are spread to, default 100
``EDGEWISE_TELEMETRY_FINE_RETENTION``
                                seconds the 10 s telemetry history is kept,
                                default 21600 (6 hours)
``EDGEWISE_TELEMETRY_COARSE_RETENTION``
                                seconds the 5 min telemetry history (and the
                                record of lost telemetry) is kept, default
                                2592000 (30 days)
``EDGEWISE_TELEMETRY_PRUNE_INTERVAL``
                                seconds between prunes of that history,
                                default 300
``EDGEWISE_MAP_TILE_URL``       optional tile server for the fleet map, e.g.
                                ``https://tile.example.org/{z}/{x}/{y}.png``;
                                default none: the map draws the bundled
                                Natural Earth basemap and fetches nothing
``EDGEWISE_MAP_TILE_ATTRIBUTION``
                                the attribution those tiles require (HTML
                                shown on the map), default empty
``EDGEWISE_LOGIN_MAX_FAILURES`` failed logins for one username, or from one
                                address, before it must wait, default 5
``EDGEWISE_LOGIN_WINDOW_S``     seconds those failures count for, default 900
``EDGEWISE_METRICS_TOKEN``      bearer token (32+ characters) a Prometheus
                                scraper sends to ``/metrics`` (or
                                ``EDGEWISE_METRICS_TOKEN_FILE``); default none:
                                only administrators' sessions may read it
==============================  ===============================================
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from orchestrator.env import (
    ConfigError,
    database_from_url,
    env_bool,
    env_float,
    env_header,
    env_int,
    env_list,
    env_secret,
    env_str,
    secret_key_ensure,
)

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("EDGEWISE_DEBUG", False)
DATA_DIR = Path(env_str("EDGEWISE_DATA_DIR", str(BASE_DIR / "var"))).resolve()
DATABASE_URL = env_secret("DATABASE_URL")
REDIS_URL = env_secret("REDIS_URL")
EMBEDDED = not DATABASE_URL and not REDIS_URL

SECRET_KEY = env_secret("EDGEWISE_SECRET_KEY")
# The key this process generated (or reused) in DATA_DIR, else None; the demo
# hands it to the processes it starts.
SECRET_KEY_GENERATED_PATH: Path | None = None
if not SECRET_KEY:
    if not (DEBUG or EMBEDDED):
        # Production never falls back to a key anyone could read in this file,
        # nor to one per host that would differ between the processes.
        raise ConfigError(
            "EDGEWISE_SECRET_KEY (or EDGEWISE_SECRET_KEY_FILE, a file holding it) must be set when "
            "EDGEWISE_DEBUG is off and DATABASE_URL or REDIS_URL is set; make one with: "
            "python -c 'import secrets; print(secrets.token_urlsafe(50))'"
        )
    SECRET_KEY_GENERATED_PATH = DATA_DIR / "secret_key"
    SECRET_KEY = secret_key_ensure(SECRET_KEY_GENERATED_PATH)

SIGNING_KEY_PATH = Path(env_str("EDGEWISE_SIGNING_KEY_PATH", str(DATA_DIR / "signing_key.pem")))
PUBLIC_URL = env_str("EDGEWISE_PUBLIC_URL").rstrip("/")
_public = urlsplit(PUBLIC_URL)
if PUBLIC_URL and (_public.scheme not in {"http", "https"} or not _public.hostname):
    raise ConfigError(f"EDGEWISE_PUBLIC_URL={PUBLIC_URL!r} is not an http(s) URL with a host")
AUDIT_KEY_PATH = Path(env_str("EDGEWISE_AUDIT_KEY_PATH", str(DATA_DIR / "audit_log_key.pem")))
AUDIT_ORIGIN = env_str("EDGEWISE_AUDIT_ORIGIN", f"{_public.hostname or 'edgewise.local'}/edgewise/audit")
if not AUDIT_ORIGIN or any(c.isspace() or c == "+" for c in AUDIT_ORIGIN):
    raise ConfigError(f"EDGEWISE_AUDIT_ORIGIN={AUDIT_ORIGIN!r} must be non-empty, without spaces or '+'")
AUDIT_ANCHOR_DIR = Path(env_str("EDGEWISE_AUDIT_ANCHOR_DIR", str(DATA_DIR / "audit-anchors")))
AUDIT_CHECKPOINT_INTERVAL_S = env_float("EDGEWISE_AUDIT_CHECKPOINT_INTERVAL", 10.0)
AUDIT_CHECKPOINT_ENTRIES = env_int("EDGEWISE_AUDIT_CHECKPOINT_ENTRIES", 1000)
# The public URL's host is where nodes and browsers reach this install, so it is allowed by default.
ALLOWED_HOSTS = env_list("EDGEWISE_ALLOWED_HOSTS",
                         ["localhost", "127.0.0.1", "[::1]", *([_public.hostname] if _public.hostname else [])])
CSRF_TRUSTED_ORIGINS = env_list("EDGEWISE_CSRF_TRUSTED_ORIGINS", [])
for _origin in CSRF_TRUSTED_ORIGINS:
    if urlsplit(_origin).scheme not in {"http", "https"} or not urlsplit(_origin).netloc:
        raise ConfigError(f"EDGEWISE_CSRF_TRUSTED_ORIGINS: {_origin!r} is not an origin "
                          "(scheme and host, e.g. https://edgewise.example.org)")

# HTTPS. An https:// public URL redirects plain HTTP and marks cookies Secure by default; http:// (or unset)
# changes nothing unless asked. HSTS stays off unless asked: browsers remember it for its whole max-age.
_https = _public.scheme == "https"
SECURE_SSL_REDIRECT = env_bool("EDGEWISE_SECURE_SSL_REDIRECT", _https)
if PUBLIC_URL and not _https:
    # Nodes dial this plain-HTTP URL (a closed site network): a redirect would break them all and protect
    # nothing (the credential has crossed already). An https:// public URL redirects the agent endpoints too.
    SECURE_REDIRECT_EXEMPT = [r"^agent/"]
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("EDGEWISE_SECURE_COOKIES", _https)
SECURE_HSTS_SECONDS = env_int("EDGEWISE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("EDGEWISE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("EDGEWISE_HSTS_PRELOAD", False)
if SECURE_HSTS_PRELOAD and not (SECURE_HSTS_SECONDS and SECURE_HSTS_INCLUDE_SUBDOMAINS):
    # Browsers' preload lists accept a domain only with both; without them the flag promises nothing.
    raise ConfigError("EDGEWISE_HSTS_PRELOAD needs EDGEWISE_HSTS_SECONDS and EDGEWISE_HSTS_INCLUDE_SUBDOMAINS")
# Only when set: behind no proxy, any client could send the header and pass
# plain HTTP off as HTTPS. Uvicorn already trusts X-Forwarded-Proto from a
# proxy on 127.0.0.1 (its --forwarded-allow-ips), so this is for proxies
# elsewhere, and the proxy must overwrite the header clients send.
_proxy_header = env_header("EDGEWISE_SECURE_PROXY_SSL_HEADER")
if _proxy_header:
    SECURE_PROXY_SSL_HEADER = (_proxy_header, "https")
WHEELHOUSE_DIR = Path(env_str("EDGEWISE_WHEELHOUSE", str(DATA_DIR / "wheelhouse"))).resolve()
ARTIFACT_DIR = Path(env_str("EDGEWISE_ARTIFACT_DIR", str(DATA_DIR / "artifacts"))).resolve()
MAX_MODEL_BYTES = int(env_float("EDGEWISE_MAX_MODEL_BYTES", 512 * 1024 * 1024))
MODEL_VALIDATION_TIMEOUT_S = env_float("EDGEWISE_MODEL_VALIDATION_TIMEOUT", 600.0)
# Seconds a request body may make no progress before 408 (orchestrator.asgi_limits).
BODY_TIMEOUT_S = env_float("EDGEWISE_BODY_TIMEOUT_S", 30.0)
AUTH_PASSWORD_VALIDATORS = [{"NAME": f"django.contrib.auth.password_validation.{v}Validator"} for v in (
    "UserAttributeSimilarity", "MinimumLength", "CommonPassword", "NumericPassword")]
LOGIN_MAX_FAILURES = env_int("EDGEWISE_LOGIN_MAX_FAILURES", 5, minimum=1)
LOGIN_WINDOW_S = env_float("EDGEWISE_LOGIN_WINDOW_S", 900.0)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "channels",
    "guardian",
    "django_htmx",
    "template_partials",
    "orchestrator",
    "audit",
    "policies",
    "sites",
    "models_registry",
    "rollouts",
    "queries",
    "metrics",
    "demo",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "orchestrator.csp.content_security_policy_middleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "metrics.middleware.request_metrics_middleware",  # after WhiteNoise: static files are not counted
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "orchestrator.urls"
ASGI_APPLICATION = "orchestrator.asgi.application"
# Messages live in the server-side session, never in a cookie: some carry a
# secret shown once (an enrollment token made in the admin).
MESSAGE_STORAGE = "django.contrib.messages.storage.session.SessionStorage"
WSGI_APPLICATION = "orchestrator.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "audit.context_processors.audit_alerts",
                "policies.context_processors.console_roles",
            ],
        },
    }
]

DB_POOL_SIZE = env_int("EDGEWISE_DB_POOL_SIZE", 10)
if DATABASE_URL:
    DATABASES = {"default": database_from_url(DATABASE_URL)}
    if DB_POOL_SIZE:
        # Under ASGI every request runs in a thread of its own; without a pool
        # each one would open (and pay for) a new PostgreSQL connection, and
        # their number would grow with the requests in flight.
        DATABASES["default"]["OPTIONS"] = {
            "pool": {"min_size": 1, "max_size": DB_POOL_SIZE, "timeout": env_float("EDGEWISE_DB_POOL_TIMEOUT", 10.0)}
        }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": DATA_DIR / "edgewise.sqlite3",
            "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE"},
        }
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "guardian.backends.ObjectPermissionBackend",
]
GUARDIAN_RAISE_403 = False
ANONYMOUS_USER_NAME = None

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "sites:fleet"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Serve straight from STATICFILES_DIRS without collectstatic in development/tests.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                # Each process waits for its messages with a blocking pop of up
                # to 5 s (channels_redis's brpop_timeout). redis-py's default
                # socket timeout is also 5 s, so an idle wait could time out
                # on the socket instead of returning empty, and the consumer
                # that happened to be waiting died with "Timeout reading". The
                # socket timeout must stay above the pop's.
                "hosts": [{"address": REDIS_URL, "socket_timeout": 15}],
                "prefix": env_str("EDGEWISE_CHANNEL_PREFIX", "edgewise"),
                # Every consumer of a process (each node's stream, each
                # browser) receives through one Redis list per process, and
                # channels_redis drops what arrives past its capacity (default
                # 100) without an error: a publish to hundreds of nodes whose
                # streams one process holds lost most of its nudges. The
                # capacity is for that process-wide list, not one consumer.
                "channel_capacity": {"specific.*": 10_000},
            },
        }
    }
    CELERY_BROKER_URL = REDIS_URL
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    # Kombu's filesystem transport: a broker that needs no server, shared by
    # the web process, the worker and beat through a folder.
    CELERY_BROKER_URL = "filesystem://"
    _queue_dir = DATA_DIR / "broker"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_queue_dir),
        "data_folder_out": str(_queue_dir),
        "processed_folder": str(_queue_dir / "processed"),
        # Exchange tables; kombu would otherwise write them to ./control in the cwd.
        "control_folder": str(_queue_dir / "control"),
        "store_processed": False,
    }

CELERY_TASK_SERIALIZER = "json"
# One queue name per installation (tests give each run its own).
CELERY_TASK_DEFAULT_QUEUE = env_str("EDGEWISE_CELERY_QUEUE", "edgewise")
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = env_bool("EDGEWISE_CELERY_EAGER", False)
CELERY_BEAT_SCHEDULE = {
    "node-liveness-sweep": {"task": "sites.node_liveness_sweep",
                            "schedule": env_float("EDGEWISE_LIVENESS_SWEEP_INTERVAL", 10.0)},
    "model-version-reconcile": {"task": "models_registry.model_version_reconcile",
                                "schedule": env_float("EDGEWISE_MODEL_RECONCILE_INTERVAL", 60.0)},
    "telemetry-prune": {"task": "sites.telemetry_prune",
                        "schedule": env_float("EDGEWISE_TELEMETRY_PRUNE_INTERVAL", 300.0)},
    "rollout-reconcile": {"task": "orchestrator.rollout_reconcile",
                          "schedule": env_float("EDGEWISE_ROLLOUT_RECONCILE_INTERVAL", 15.0)},
    "query-expire": {"task": "queries.query_expire", "schedule": env_float("EDGEWISE_QUERY_EXPIRE_INTERVAL", 5.0)},
    "audit-checkpoint": {"task": "audit.checkpoint_take", "schedule": AUDIT_CHECKPOINT_INTERVAL_S},
}
ROLLOUT_TICK_S = env_float("EDGEWISE_ROLLOUT_TICK", 5.0)
ROLLOUT_STALL_AFTER_S = env_float("EDGEWISE_ROLLOUT_STALL_AFTER", 30.0)
if ROLLOUT_STALL_AFTER_S <= ROLLOUT_TICK_S:
    raise ConfigError("EDGEWISE_ROLLOUT_STALL_AFTER must be longer than EDGEWISE_ROLLOUT_TICK")

# Node timing and retention periods, each checked against the others.
from orchestrator.intervals import *  # noqa: E402,F403

MAP_TILE_URL = env_str("EDGEWISE_MAP_TILE_URL")
if MAP_TILE_URL and not MAP_TILE_URL.startswith(("https://", "http://", "/")):
    raise ConfigError(f"EDGEWISE_MAP_TILE_URL must be an http(s) URL or a path, not {MAP_TILE_URL!r}")
MAP_TILE_ATTRIBUTION = env_str("EDGEWISE_MAP_TILE_ATTRIBUTION")
METRICS_TOKEN = env_secret("EDGEWISE_METRICS_TOKEN")
if METRICS_TOKEN and len(METRICS_TOKEN) < 32:
    raise ConfigError("EDGEWISE_METRICS_TOKEN must be at least 32 characters; make one with: "
                      "python -c 'import secrets; print(secrets.token_urlsafe(32))'")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("EDGEWISE_LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
