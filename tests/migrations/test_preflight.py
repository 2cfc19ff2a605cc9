"""The pre-flight check on the table the original project really built, and on tables the
project cannot serve: what it reports, and `migrate` and `check` refusing before any change."""
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction

from segments.demo import drop_segments
from segments.switch import preflight
from segments.switch.preflight import ERROR, INFO, WARNING
from segments.switch.user_triggers import Privilege, TriggersNotQuieted, quiet_user_triggers
from tests.conftest import manage
from tests.migrations.original_schema import execute, load_rows, original_table  # noqa: F401 (fixture)

ROLE = "test_preflight_app"  # roles are per server: a name no other test database uses


def found(report, code):
    matches = [f for f in report.findings if f.code == code]
    assert matches, f"no {code} finding in:\n{report.as_text()}"
    return matches


def one(report, code):
    (finding,) = found(report, code)
    return finding


def test_the_original_projects_table_is_served_and_every_difference_is_listed_with_its_fix(original_table):
    original_table()

    report = preflight.inspect()

    assert report.blocking == [] and report.as_dict()["blocking"] == 0
    assert all(f.fix for f in report.findings), report.as_text()
    legacy = one(report, "legacy_columns")
    assert legacy.level == INFO and "speaker_confidence is named speaker_conf" in legacy.message
    extra = one(report, "extra_columns")
    assert extra.level == INFO
    for column in ("speaker_conf", "voice_embedding", "re_asr", "is_overlap", "needs_refinement", "updated_at"):
        assert column in extra.message
    names = one(report, "index_names")
    assert "idx_segments_speaker_label is idx_segments_speaker (speaker_label)" in names.message
    assert "idx_segments_video_start is idx_segments_time (video_id, start_sec)" in names.message
    index = one(report, "vector_index")
    assert index.level == WARNING
    assert "segments_embedding_idx (ivfflat vector_l2_ops on embedding)" in index.message
    assert "idx_scan = 0" in index.message and "DROP INDEX CONCURRENTLY segments_embedding_idx" in index.fix
    view = one(report, "view")
    assert view.level == WARNING
    assert "public.segments_with_video uses segments (embedding, id, start_sec, text, video_id)" in view.message
    assert "re-points it to the new 384-dim `embedding`" in view.message
    trigger = one(report, "trigger")
    assert trigger.level == INFO and "segments_set_updated_at (BEFORE UPDATE)" in trigger.message
    assert "session_replication_role = replica" in trigger.message
    assert one(report, "not_adopted").fix.startswith("manage.py migrate --fake-initial")
    assert "revision 008" in one(report, "alembic").message


def test_the_legacy_index_is_found_by_what_it_is_and_its_scans_are_the_evidence(original_table):
    original_table()
    execute("ALTER INDEX segments_embedding_idx RENAME TO idx_whatever")
    load_rows(30)
    query = "[" + ",".join(["0.01"] * 1536) + "]"

    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")
        try:
            cursor.execute("EXPLAIN SELECT id FROM segments ORDER BY embedding <=> %s::vector LIMIT 5", [query])
            cosine_plan = "\n".join(row[0] for row in cursor.fetchall())
            cursor.execute("SELECT id FROM segments ORDER BY embedding <-> %s::vector LIMIT 5", [query])
            cursor.execute("SELECT pg_stat_force_next_flush()")  # this session's idx_scan, visible to the next
        finally:
            cursor.execute("RESET enable_seqscan")
    execute("SELECT pg_stat_clear_snapshot()")

    assert "idx_whatever" not in cosine_plan  # the cosine search cannot use an L2 index
    index = one(preflight.inspect(), "vector_index")
    assert "idx_whatever (ivfflat vector_l2_ops on embedding)" in index.message
    assert "idx_scan = 1" in index.message and "orders by L2 (`<->`) distance and uses it" in index.message
    assert index.fix.endswith("keep it while that query needs it")


def _float8_embedding():
    execute("DROP VIEW segments_with_video; DROP INDEX segments_embedding_idx; "
            "ALTER TABLE segments ALTER COLUMN embedding TYPE double precision[] USING embedding::real[]")


def _no_video_type():
    execute("ALTER TABLE segments DROP COLUMN video_type")


def _rule():
    execute("CREATE RULE segments_keep AS ON DELETE TO segments DO INSTEAD NOTHING")


REFUSED = {
    "embedding as double precision[]": (_float8_embedding, "embedding_type", "segments.E007",
                                        "USING embedding::vector(1536)"),
    "no video_type": (_no_video_type, "column_missing", "segments.E004",
                      "ALTER TABLE segments ADD COLUMN video_type varchar(20)"),
    "a rule on segments": (_rule, "rule", "segments.E016", "DROP RULE segments_keep ON segments"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", REFUSED)
def test_a_table_the_project_cannot_serve_is_refused_before_anything_changes(original_table, schema_dump, case):
    alter, code, check_id, fix = REFUSED[case]
    original_table()
    load_rows(20)
    alter()
    error = one(preflight.inspect(), code)
    assert error.level == ERROR and fix in error.fix
    schema = schema_dump()
    recorded = execute("SELECT app, name FROM django_migrations ORDER BY id")

    with pytest.raises(CommandError) as refused:  # in-process, system checks skipped: migrate's own pre-flight
        call_command("migrate", fake_initial=True, verbosity=0)
    migrate = manage("migrate", "--fake-initial")
    migrate_out, migrate_err = migrate.communicate(timeout=300)
    check = manage("check", "--database", "default")
    check_out, check_err = check.communicate(timeout=300)

    assert "Phase 1 refused, nothing was changed" in str(refused.value) and fix in str(refused.value)
    assert migrate.returncode != 0 and check_id in migrate_err and fix in migrate_err, migrate_out + migrate_err
    assert check.returncode != 0 and check_id in check_err and fix in check_err, check_out + check_err
    assert schema_dump() == schema
    assert execute("SELECT app, name FROM django_migrations ORDER BY id") == recorded


@pytest.mark.parametrize("case", ["embedding as double precision[]", "no video_type"])
def test_applying_the_fix_of_a_refused_table_makes_it_servable(original_table, case):
    alter, code, _, _ = REFUSED[case]
    original_table()
    load_rows(20)
    alter()

    execute(one(preflight.inspect(), code).fix.split(";")[0])

    assert preflight.inspect().blocking == []
    assert execute("SELECT count(*) FROM segments WHERE vector_dims(embedding) = 1536") == [(20,)]


@pytest.mark.parametrize("ddl, kind", [
    ("CREATE MATERIALIZED VIEW segments_per_video AS SELECT video_id, avg(embedding) AS centroid "
     "FROM segments GROUP BY video_id", "materialized view"),
    ("CREATE VIEW segments_recent AS SELECT * FROM segments_with_video WHERE id > 100", "view"),
])
def test_a_dependent_the_swap_cannot_carry_over_is_an_error_with_its_fix(original_table, ddl, kind):
    original_table()
    execute(ddl)

    (blocked,) = [f for f in found(preflight.inspect(), "view_blocked")]

    assert blocked.level == ERROR and blocked.message.startswith(kind.capitalize())
    assert blocked.fix.startswith("DROP MATERIALIZED VIEW public.segments_per_video;" if kind != "view" else
                                  "DROP VIEW public.segments_with_video CASCADE")


def test_a_view_not_using_the_embedding_is_listed_as_unaffected(original_table):
    original_table()
    execute("CREATE VIEW segment_times AS SELECT video_id, start_sec, end_sec FROM segments")

    views = {f.message: f.level for f in found(preflight.inspect(), "view")}

    assert views["View public.segment_times uses segments (end_sec, start_sec, video_id): the switch does not "
                 "affect it."] == INFO


@pytest.fixture
def app_role():
    """A role that is not a superuser, as an application's DATABASE_URL usually has."""
    execute(f"DROP ROLE IF EXISTS {ROLE}; CREATE ROLE {ROLE}")
    yield ROLE
    execute("RESET ROLE; RESET session_replication_role")
    execute(f"DROP OWNED BY {ROLE}; DROP ROLE {ROLE}")


def test_user_triggers_need_the_right_to_set_session_replication_role(original_table, app_role):
    original_table()
    execute(f"GRANT SELECT ON django_migrations, alembic_version TO {app_role}; SET ROLE {app_role}")

    error = one(preflight.inspect(), "trigger_privilege")
    with connection.cursor() as cursor, pytest.raises(TriggersNotQuieted) as refused:
        quiet_user_triggers(cursor)

    assert error.level == ERROR and "segments_set_updated_at" in error.message
    assert error.fix == f"as a superuser: GRANT SET ON PARAMETER session_replication_role TO {app_role};"
    assert error.fix in str(refused.value)
    assert execute("SHOW session_replication_role") == [("origin",)]

    execute(f"RESET ROLE; GRANT SET ON PARAMETER session_replication_role TO {app_role}; SET ROLE {app_role}")
    report = preflight.inspect()
    with transaction.atomic(), connection.cursor() as cursor:
        quieted = quiet_user_triggers(cursor)
        during = execute("SHOW session_replication_role")

    assert report.blocking == [] and one(report, "trigger").level == INFO
    assert quieted == ["segments_set_updated_at"]
    assert during == [("replica",)]  # for the transaction that writes,
    assert execute("SHOW session_replication_role") == [("origin",)]  # and no longer: nothing stays on the session


@pytest.mark.parametrize("change, level, quieted", [
    ("ALTER TABLE segments ENABLE ALWAYS TRIGGER segments_set_updated_at", WARNING, []),
    ("DROP TRIGGER segments_set_updated_at ON segments; CREATE TRIGGER segments_set_updated_at BEFORE UPDATE OF "
     "text ON segments FOR EACH ROW EXECUTE FUNCTION segments_set_updated_at()", INFO, []),
    ("ALTER TABLE segments DISABLE TRIGGER segments_set_updated_at", INFO, []),
])
def test_triggers_the_replica_role_cannot_quiet_or_need_not_are_reported_and_left_alone(original_table, change,
                                                                                      level, quieted):
    original_table()
    execute(change)

    trigger = one(preflight.inspect(), "trigger")
    with connection.cursor() as cursor:
        assert quiet_user_triggers(cursor) == quieted

    assert trigger.level == level and "segments_set_updated_at" in trigger.message
    assert execute("SHOW session_replication_role") == [("origin",)]


def test_a_fresh_install_has_nothing_to_report(segments_at):
    drop_segments()

    assert preflight.inspect().findings == []


def test_the_projects_own_final_table_has_no_error_or_warning(db):
    report = preflight.inspect()

    assert [f for f in report.findings if f.level != INFO] == []


@pytest.mark.parametrize("versions, level, words", [
    ((120017, "12.17", "0.8.1", "0.8.1"), ERROR, "PostgreSQL 12.17: the project needs 13 or later"),
    ((160004, "16.4", None, "0.7.4"), ERROR, "pgvector extension is not installed"),
    ((160004, "16.4", "0.4.4", "0.4.4"), ERROR, "has no HNSW index"),
    ((160004, "16.4", "0.6.2", "0.6.2"), WARNING, "may return fewer results than asked for"),
    ((160004, "16.4", "0.7.4", "0.7.4"), WARNING, "may return fewer results than asked for"),
    ((180006, "18.6", "0.8.1", "0.8.1"), INFO, "all available"),
])
def test_versions_are_judged_by_what_each_feature_needs(versions, level, words):
    findings = preflight.version_findings(*versions)

    assert [f.level for f in findings if words in f.message] == [level]


@pytest.mark.parametrize("version, fix", [
    (150008, "as a superuser: GRANT SET ON PARAMETER session_replication_role TO app;"),
    (140013, "PostgreSQL 14 lets only superusers set session_replication_role: run the switch's commands as a "
             "superuser"),
])
def test_the_fix_for_a_missing_privilege_depends_on_the_server_version(version, fix):
    assert Privilege(False, "app", version).fix.startswith(fix)
