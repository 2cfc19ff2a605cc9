"""Malformed settings stop start-up with an error that names the variable."""
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def start(**env):
    return subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); from django.conf import settings; "
                               "print(settings.EMBEDDING_DIMENSIONS, settings.ENABLE_RERANKER, settings.EMBEDDING_DEVICE)"],
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "askdrchaffee.settings", **env},
        cwd=ROOT, capture_output=True, text=True,
    )


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("EMBEDDING_DIMENSIONS", "384d", "EMBEDDING_DIMENSIONS='384d' is not a valid int"),
        ("EMBEDDING_DIMENSIONS", "0", "EMBEDDING_DIMENSIONS='0' must be at least 1"),
        ("EMBEDDING_TEXTS_PER_CALL", "-5", "EMBEDDING_TEXTS_PER_CALL='-5' must be at least 1"),
        ("EMBEDDING_DEVICE", "tpu", "EMBEDDING_DEVICE='tpu' must be one of: auto, cpu, cuda, mps"),
        ("ENABLE_RERANKER", "maybe", "ENABLE_RERANKER='maybe' is not a valid boolean"),
        ("RERANK_TOP_K", "many", "RERANK_TOP_K='many' is not a valid int"),
        ("DATABASE_URL", "not a url", "is not a valid database URL for PostgreSQL"),
        ("INDEX_MAINTENANCE_WORK_MEM", "lots", "INDEX_MAINTENANCE_WORK_MEM='lots' is not a valid memory size"),
        ("INDEX_MAINTENANCE_WORK_MEM", "512kB", "INDEX_MAINTENANCE_WORK_MEM='512kB' is not a valid memory size from"),
        ("INDEX_MAINTENANCE_WORK_MEM_MAX", "auto", "INDEX_MAINTENANCE_WORK_MEM_MAX='auto' is not a valid memory size"),
        ("INDEX_PARALLEL_WORKERS", "-1", "INDEX_PARALLEL_WORKERS='-1' is not a valid number of workers from 0 to 1024"),
    ],
)
def test_a_malformed_value_is_an_error_naming_the_variable(name, value, message):
    result = start(**{name: value})
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert message in result.stderr


def test_the_former_name_of_texts_per_call_stops_start_up_naming_the_new_one():
    result = start(EMBEDDING_BATCH_SIZE="64")
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert ("EMBEDDING_BATCH_SIZE was renamed EMBEDDING_TEXTS_PER_CALL (texts per model call; the backfill's "
            "--batch-size is rows per claim): rename it in your environment.") in result.stderr


def test_well_formed_values_are_read():
    result = start(EMBEDDING_DIMENSIONS="768", ENABLE_RERANKER="yes", EMBEDDING_DEVICE="cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["768", "True", "cpu"]


@pytest.mark.parametrize("env, expected", [
    ({}, "None 8589934592 None"),
    ({"INDEX_MAINTENANCE_WORK_MEM": "auto", "INDEX_PARALLEL_WORKERS": "auto"}, "None 8589934592 None"),
    ({"INDEX_MAINTENANCE_WORK_MEM": "2GB", "INDEX_MAINTENANCE_WORK_MEM_MAX": "512 MB", "INDEX_PARALLEL_WORKERS": "3"},
     "2147483648 536870912 3"),
    ({"INDEX_MAINTENANCE_WORK_MEM": "65536"}, "67108864 8589934592 None"),  # no unit: kB, as PostgreSQL reads it
])
def test_index_build_settings_are_auto_or_a_postgres_size(env, expected):
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); from django.conf import settings as s; print("
                               "s.INDEX_MAINTENANCE_WORK_MEM, s.INDEX_MAINTENANCE_WORK_MEM_MAX, s.INDEX_PARALLEL_WORKERS)"],
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "askdrchaffee.settings", **env}, cwd=ROOT, capture_output=True,
        text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected
