"""The HNSW build sized to its graph (segments/index_build.py): the graph estimate checked against
where pgvector itself runs out of maintenance_work_mem, and the memory and workers chosen."""
import re
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection

from segments import index_build
from segments.models import HNSW_M
from segments.switch import status
from tests.embeddings.conftest import add_segments

MB = 2**20
TOLERANCE = 0.02  # the estimate against pgvector's own count; measured: within 0.5%
NOTICE = re.compile(r"hnsw graph no longer fits into maintenance_work_mem after (\d+) tuples")


def scratch_table(value_type, rows):
    """A table `graph_probe` of `rows` random `value_type` values (rolled back with the test)."""
    dims = int(re.search(r"\d+", value_type)[0])
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE graph_probe (id serial PRIMARY KEY, v {value_type})")
        cursor.execute(f"INSERT INTO graph_probe (v) SELECT (SELECT array_agg(random() - 0.5) FROM generate_series(1, "
                       f"{dims}) WHERE g > 0)::vector::{value_type} FROM generate_series(1, %s) g", [rows])


def tuples_in_memory(opclass, maintenance_work_mem, workers):
    """Build an HNSW index on graph_probe; the tuples pgvector's NOTICE says fitted in memory, or None."""
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL maintenance_work_mem = %s", [f"{maintenance_work_mem // 1024}kB"])
        cursor.execute("SET LOCAL max_parallel_maintenance_workers = %s", [workers])
        if workers:
            cursor.execute(f"ALTER TABLE graph_probe SET (parallel_workers = {workers})")
            cursor.execute("SET LOCAL min_parallel_table_scan_size = 0")
        connection.connection.notices.clear()
        cursor.execute(f"CREATE INDEX ON graph_probe USING hnsw (v {opclass}) WITH (m = {HNSW_M})")
    found = [NOTICE.search(notice) for notice in connection.connection.notices]
    return next((int(match[1]) for match in found if match), None)


def predicted_tuples(value_type, maintenance_work_mem, parallel):
    per_element = index_build.element_bytes(index_build.value_bytes(value_type), HNSW_M, parallel)
    return index_build.graph_capacity(maintenance_work_mem, parallel) / per_element


@pytest.mark.parametrize("value_type, opclass", [("vector(384)", "vector_cosine_ops"),
                                                 ("halfvec(384)", "halfvec_cosine_ops")])
def test_the_estimate_matches_where_a_serial_build_runs_out_of_memory(db, value_type, opclass):
    # 1MB, the least maintenance_work_mem PostgreSQL accepts: ~470 (vector) or ~710 (halfvec) rows fit.
    scratch_table(value_type, 900)

    reported = tuples_in_memory(opclass, MB, workers=0)

    assert reported is not None, "pgvector said nothing: the graph fitted, the table is too small to tell"
    assert predicted_tuples(value_type, MB, parallel=False) == pytest.approx(reported, rel=TOLERANCE)


def test_the_estimate_matches_where_a_parallel_build_runs_out_of_memory(db):
    # A parallel build keeps 4 MB of its shared segment: 5MB leaves 1 MB of graph, ~470 rows.
    scratch_table("vector(384)", 700)

    reported = tuples_in_memory("vector_cosine_ops", 5 * MB, workers=2)

    if reported is None:  # 700 rows fit in 5MB serially: the server could start no worker
        pytest.skip("no parallel worker could be started on this server just now")
    assert predicted_tuples("vector(384)", 5 * MB, parallel=True) == pytest.approx(reported, rel=TOLERANCE)


def test_the_estimate_reads_the_columns_type_and_counts_rows_with_a_vector(db):
    scratch_table("halfvec(384)", 10)
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO graph_probe (v) VALUES (NULL), (NULL)")
        graph = index_build.estimate(cursor, "graph_probe", "v", HNSW_M)

    assert (graph.value_type, graph.rows) == ("halfvec(384)", 10)
    assert graph.bytes == pytest.approx(10 * 1482.7, abs=1)


def plan(**session):
    with connection.cursor() as cursor:
        for name, value in session.items():
            cursor.execute("SELECT set_config(%s, %s, true)", [name, str(value)])
        return index_build.plan(cursor, "graph_probe", "v", HNSW_M)


def test_auto_keeps_the_servers_memory_when_the_graph_fits_in_it(db):
    scratch_table("vector(384)", 100)

    chosen = plan(maintenance_work_mem="64MB")

    assert chosen.maintenance_work_mem == 64 * MB and chosen.fits
    assert chosen.maintenance_work_mem_why.startswith("the server's own value, which holds the estimated graph")
    assert chosen.warning is None


def test_auto_sizes_memory_to_the_graph_with_headroom(db):
    scratch_table("vector(384)", 900)  # 900 x 2,251 bytes: 1.9 MB of graph

    chosen = plan(maintenance_work_mem="1MB", max_parallel_workers=0)

    assert chosen.parallel_workers == 0
    assert chosen.maintenance_work_mem == 3 * MB  # 1.9 MB + 25%, rounded up to whole MB
    assert "900 × vector(384) at 2,251 bytes" in chosen.maintenance_work_mem_why and chosen.fits
    assert chosen.session_settings() == {"maintenance_work_mem": "3072kB", "max_parallel_maintenance_workers": "0"}


def test_auto_adds_what_a_parallel_build_keeps_for_itself(db):
    scratch_table("vector(384)", 900)

    chosen = plan(maintenance_work_mem="1MB", max_parallel_workers=3)

    assert chosen.parallel_workers == 3 and "max_parallel_workers = 3" in chosen.parallel_workers_why
    assert chosen.maintenance_work_mem == 7 * MB and "4 MB for a parallel build" in chosen.maintenance_work_mem_why
    assert chosen.fits


def test_the_ceiling_caps_auto_and_the_operator_is_warned(db, settings):
    settings.INDEX_MAINTENANCE_WORK_MEM_MAX = 2 * MB
    scratch_table("vector(384)", 1000)  # 2.1 MB of graph

    chosen = plan(maintenance_work_mem="1MB", max_parallel_workers=0)

    assert chosen.maintenance_work_mem == 2 * MB and chosen.fits is False
    assert chosen.maintenance_work_mem_why.startswith("INDEX_MAINTENANCE_WORK_MEM_MAX = 2.0 MB; it needs 3.0 MB")
    assert "Raise INDEX_MAINTENANCE_WORK_MEM_MAX (or set INDEX_MAINTENANCE_WORK_MEM) to about 3.0 MB" in chosen.warning


def test_auto_never_goes_below_the_servers_own_value(db, settings):
    settings.INDEX_MAINTENANCE_WORK_MEM_MAX = 2 * MB
    scratch_table("vector(384)", 10)

    assert plan(maintenance_work_mem="64MB").maintenance_work_mem == 64 * MB


def test_explicit_settings_win(db, settings):
    settings.INDEX_MAINTENANCE_WORK_MEM, settings.INDEX_PARALLEL_WORKERS = 5 * MB, 1
    scratch_table("vector(384)", 10)

    chosen = plan(maintenance_work_mem="64MB")

    assert (chosen.maintenance_work_mem, chosen.parallel_workers) == (5 * MB, 1)
    assert (chosen.maintenance_work_mem_why, chosen.parallel_workers_why) == ("INDEX_MAINTENANCE_WORK_MEM",
                                                                              "INDEX_PARALLEL_WORKERS")


def test_auto_workers_stay_within_the_servers_worker_limits(db):
    scratch_table("vector(384)", 10)
    with connection.cursor() as cursor:
        limits = index_build.server_limits(cursor)

    chosen = plan()

    assert chosen.parallel_workers == min(max(7, limits["max_parallel_maintenance_workers"]),
                                          limits["max_parallel_workers"], limits["max_worker_processes"] - 1)


def fill(column, ids, dims=384):
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE segments SET {column} = (SELECT array_agg(random() - 0.5) FROM generate_series(1, "
                       f"{dims}) WHERE id > 0)::vector WHERE id = ANY(%s)", [list(ids)])


def test_the_index_step_says_what_it_chose_and_warns_before_a_build_that_will_not_fit(segments_at, settings):
    settings.INDEX_MAINTENANCE_WORK_MEM, settings.INDEX_PARALLEL_WORKERS = MB, 0
    settings.EMBEDDING_STORAGE = "vector"  # the figures below are vector(384)'s (halfvec's are checked above)
    segments_at("expanded")
    fill("embedding_384", add_segments([f"segment {i}" for i in range(600)]))  # 1.3 MB of graph

    out = StringIO()
    call_command("embedding_switch", "index", stdout=out, no_color=True)

    text = out.getvalue()
    said = text.index("Building index segments_embedding_384_hnsw with maintenance_work_mem = 1.0 MB "
                      "(INDEX_MAINTENANCE_WORK_MEM) and max_parallel_maintenance_workers = 0 (INDEX_PARALLEL_WORKERS).")
    warned = text.index("segments_embedding_384_hnsw: The HNSW graph of 600 vector(384) values needs about 1.3 MB, "
                        "more than the maintenance_work_mem of 1.0 MB the build will use")
    assert said < warned < text.index("HNSW index built in")
    assert "(maintenance_work_mem 1.0 MB, up to 0 parallel worker(s))" in text


def test_embedding_status_shows_the_build_plan_and_warns_before_the_index(segments_at, settings):
    settings.INDEX_MAINTENANCE_WORK_MEM = MB
    settings.EMBEDDING_STORAGE = "vector"  # the figures below are vector(384)'s
    segments_at("expanded")
    add_segments([f"segment {i}" for i in range(600)])  # none embedded yet: sized for all 600

    found = status.collect()
    out = StringIO()
    call_command("embedding_status", stdout=out, no_color=True)

    plan_ = found["index_plan"]
    assert plan_["estimate"]["rows"] == 600 and plan_["estimate"]["value_type"] == "vector(384)"
    assert plan_["maintenance_work_mem"] == MB and plan_["fits"] is False
    assert any(warning.startswith("Before `python manage.py embedding_switch index`: The HNSW graph of 600")
               for warning in found["warnings"])
    text = out.getvalue()
    assert "HNSW build: graph of 600 × vector(384) ≈ 1.3 MB; maintenance_work_mem 1.0 MB" in text
    assert "(does NOT fit)" in text and "  memory: INDEX_MAINTENANCE_WORK_MEM" in text
    assert "! Before `python manage.py embedding_switch index`: The HNSW graph of 600" in text
