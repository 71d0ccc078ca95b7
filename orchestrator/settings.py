"""Settings for the Edgewise control plane, driven by environment variables.

Production sets ``DATABASE_URL`` (PostgreSQL) and ``REDIS_URL`` (Celery broker,
Channels layer). With neither set, the control plane runs *embedded* on one
machine with only Python: SQLite, an in-process channel layer and Celery's
filesystem broker. It says so when it starts (see ``orchestrator.apps``).

Every variable:

==============================  ===============================================
``DATABASE_URL``                ``postgres://user:pass@host:5432/name``
``REDIS_URL``                   ``redis://host:6379/0``
``EDGEWISE_DB_POOL_SIZE``       PostgreSQL connections each process keeps in
                                its pool, default 10; 0 turns pooling off
``EDGEWISE_SECRET_KEY``         Django secret key (required unless DEBUG)
``EDGEWISE_DEBUG``              true/false, default false
``EDGEWISE_ALLOWED_HOSTS``      comma separated, default ``localhost,127.0.0.1``
``EDGEWISE_DATA_DIR``           where the embedded database, signing key and
                                artifacts live; default ``./var``
``EDGEWISE_SIGNING_KEY_PATH``   Ed25519 PEM; created on first use if missing
``EDGEWISE_PUBLIC_URL``         the URL nodes dial (written into installers);
                                default: taken from the request
``EDGEWISE_WHEELHOUSE``         folder of extra ``.whl`` files (the edge
                                runtime's dependencies) served to sites at
                                ``/agent/v1/dist/`` for installs without a
                                package index; default ``DATA_DIR/wheelhouse``
``EDGEWISE_CELERY_QUEUE``       the Celery queue tasks go to, default ``edgewise``
``EDGEWISE_ARTIFACT_DIR``       content-addressed model artifacts, default
                                ``DATA_DIR/artifacts``
``EDGEWISE_MAX_MODEL_BYTES``    largest model file accepted, default 512 MiB
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
==============================  ===============================================
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.env import ConfigError, database_from_url, env_bool, env_float, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("EDGEWISE_DEBUG", False)
SECRET_KEY = env_str("EDGEWISE_SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG and env_bool("EDGEWISE_REQUIRE_SECRET_KEY", False):
        raise ConfigError("EDGEWISE_SECRET_KEY must be set")
    # An embedded or development install gets a fixed, clearly named key.
    SECRET_KEY = "edgewise-insecure-development-key-set-EDGEWISE_SECRET_KEY"
ALLOWED_HOSTS = env_list("EDGEWISE_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("EDGEWISE_CSRF_TRUSTED_ORIGINS", [])

DATA_DIR = Path(env_str("EDGEWISE_DATA_DIR", str(BASE_DIR / "var"))).resolve()
SIGNING_KEY_PATH = Path(env_str("EDGEWISE_SIGNING_KEY_PATH", str(DATA_DIR / "signing_key.pem")))
PUBLIC_URL = env_str("EDGEWISE_PUBLIC_URL").rstrip("/")
WHEELHOUSE_DIR = Path(env_str("EDGEWISE_WHEELHOUSE", str(DATA_DIR / "wheelhouse"))).resolve()
ARTIFACT_DIR = Path(env_str("EDGEWISE_ARTIFACT_DIR", str(DATA_DIR / "artifacts"))).resolve()
MAX_MODEL_BYTES = int(env_float("EDGEWISE_MAX_MODEL_BYTES", 512 * 1024 * 1024))
MODEL_VALIDATION_TIMEOUT_S = env_float("EDGEWISE_MODEL_VALIDATION_TIMEOUT", 600.0)

DATABASE_URL = env_str("DATABASE_URL")
REDIS_URL = env_str("REDIS_URL")
EMBEDDED = not DATABASE_URL and not REDIS_URL

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
    "policies.queries",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "orchestrator.csp.content_security_policy_middleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
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
    "node-liveness-sweep": {
        "task": "sites.node_liveness_sweep",
        "schedule": env_float("EDGEWISE_LIVENESS_SWEEP_INTERVAL", 10.0),
    },
    "model-version-reconcile": {
        "task": "models_registry.model_version_reconcile",
        "schedule": env_float("EDGEWISE_MODEL_RECONCILE_INTERVAL", 60.0),
    },
    "telemetry-prune": {
        "task": "sites.telemetry_prune",
        "schedule": env_float("EDGEWISE_TELEMETRY_PRUNE_INTERVAL", 300.0),
    },
    "rollout-reconcile": {
        "task": "orchestrator.rollout_reconcile",
        "schedule": env_float("EDGEWISE_ROLLOUT_RECONCILE_INTERVAL", 15.0),
    },
    "query-expire": {
        "task": "queries.query_expire",
        "schedule": env_float("EDGEWISE_QUERY_EXPIRE_INTERVAL", 5.0),
    },
}
ROLLOUT_TICK_S = env_float("EDGEWISE_ROLLOUT_TICK", 5.0)
ROLLOUT_STALL_AFTER_S = env_float("EDGEWISE_ROLLOUT_STALL_AFTER", 30.0)
if ROLLOUT_STALL_AFTER_S <= ROLLOUT_TICK_S:
    raise ConfigError("EDGEWISE_ROLLOUT_STALL_AFTER must be longer than EDGEWISE_ROLLOUT_TICK")

SYNC_INTERVAL_S = env_float("EDGEWISE_SYNC_INTERVAL", 10.0)
NODE_STALE_AFTER_S = env_float("EDGEWISE_NODE_STALE_AFTER", 3 * SYNC_INTERVAL_S)
NODE_OFFLINE_AFTER_S = env_float("EDGEWISE_NODE_OFFLINE_AFTER", 12 * SYNC_INTERVAL_S)
if NODE_OFFLINE_AFTER_S <= NODE_STALE_AFTER_S:
    raise ConfigError("EDGEWISE_NODE_OFFLINE_AFTER must be longer than EDGEWISE_NODE_STALE_AFTER")

TELEMETRY_FINE_RETENTION_S = env_float("EDGEWISE_TELEMETRY_FINE_RETENTION", 6 * 3600.0)
TELEMETRY_COARSE_RETENTION_S = env_float("EDGEWISE_TELEMETRY_COARSE_RETENTION", 30 * 86400.0)
if not 0 < TELEMETRY_FINE_RETENTION_S <= TELEMETRY_COARSE_RETENTION_S:
    raise ConfigError("EDGEWISE_TELEMETRY_FINE_RETENTION must be positive and at most "
                      "EDGEWISE_TELEMETRY_COARSE_RETENTION")
MAP_TILE_URL = env_str("EDGEWISE_MAP_TILE_URL")
if MAP_TILE_URL and not MAP_TILE_URL.startswith(("https://", "http://", "/")):
    raise ConfigError(f"EDGEWISE_MAP_TILE_URL must be an http(s) URL or a path, not {MAP_TILE_URL!r}")
MAP_TILE_ATTRIBUTION = env_str("EDGEWISE_MAP_TILE_ATTRIBUTION")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("EDGEWISE_LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
