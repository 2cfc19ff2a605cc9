"""`manage.py embedding_eval` and the swap's go/no-go check, on demo segments with vectors made for the
case (no model to load): the demo's simulated legacy vectors beside a new column that either follows
the videos' subjects (a model whose neighbours are the same moment) or gives every text nearly the same
vector (a model whose weights mean nothing); with an old column of such vectors too, the models mode with
labelled questions and the questions users asked. Far from the database: the searches' statements counted
behind a slow link, their plans, results and timeouts. The real models' cases: tests/test_evaluation_models.py.
"""
import dataclasses
import json
import time
from io import StringIO

import numpy as np
import psycopg2
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from embeddings import ledger
from embeddings.encoder import normalise
from embeddings.fakes import HashingEncoder
from segments.demo_data import SUBJECTS
from segments.evaluation import run, searching, table
from segments.evaluation.record import swap_options
from segments.models import SwitchEvent
from segments.schema import embedding_schema, vector_column_types
from segments.search import has_iterative_scan, nearest
from segments.switch import status, steps
from segments.switch.backfill import run_backfill
from segments.switch.verify import verify

pytestmark = pytest.mark.django_db(transaction=True)

COUNT = 200
SWITCH_PAGE = "/admin/segments/embeddingswitch/"


class SubjectEncoder(HashingEncoder):
    """Vectors that follow the demo's subjects: each subject a text names adds its own direction to a little
    of the text's own (hash) direction. Its neighbours talk about the same thing, as a model's would."""

    def __init__(self, noise=0.3, name="subjects-384", dimensions=384):
        super().__init__(dimensions)
        self.noise, self.model_name = noise, name

    def encode_documents(self, texts, texts_per_call=None):
        texts = list(texts)
        if not texts:
            return np.empty((0, self.dimensions), dtype=np.float32)
        own = HashingEncoder.encode_documents(self, texts)
        directions = HashingEncoder.encode_documents(self, SUBJECTS)
        named = np.array([[subject in text for subject in SUBJECTS] for text in texts], dtype=np.float32)
        return normalise(named @ directions + self.noise * own)

    def model_identity(self):
        probes = self.encode_documents(list(ledger.PROBE_TEXTS))
        rounded = tuple(tuple(round(float(x), 5) for x in row) for row in probes)
        return ledger.ModelIdentity(self.model_name, self.dimensions, rounded, "test vectors", True, "")


class CollapsedEncoder(SubjectEncoder):
    """Nearly the same vector for every text, as a model with random weights gives."""

    def encode_documents(self, texts, texts_per_call=None):
        texts = list(texts)
        if not texts:
            return np.empty((0, self.dimensions), dtype=np.float32)
        base = HashingEncoder.encode_documents(self, ["every text"])[0]
        return normalise(base + 0.002 * HashingEncoder.encode_documents(self, texts))


ENCODERS = {"topical": SubjectEncoder(), "collapsed": CollapsedEncoder(name="collapsed-384")}


@pytest.fixture
def expanded(segments_at):
    """Before the first swap: demo segments with simulated legacy vectors, the new column written by the
    `kind` encoder ("topical" or "collapsed"), and its index; the encoder."""

    def build(kind):
        segments_at("expanded")
        call_command("load_demo_segments", count=COUNT, seed=2, stdout=StringIO())
        run_backfill(ENCODERS[kind])
        steps.index()
        return ENCODERS[kind]

    return build


def evaluate(*args, encoder=None, encoders=None):
    """(exit status, the JSON report) of `embedding_eval --json --queries 50 *args`, `encoder` embedding the new
    side's questions (`encoders` each side's)."""
    out = StringIO()
    try:
        call_command("embedding_eval", "--json", "--queries", "50", *args, stdout=out, stderr=StringIO(),
                     encoders=encoders or ({"new": encoder} if encoder else None))
    except SystemExit as exc:
        return exc.code, json.loads(out.getvalue())
    return 0, json.loads(out.getvalue())


def test_before_the_first_swap_the_stored_vector_mode_judges_each_column_and_says_go(expanded, admin_client):
    expanded("topical")

    code, report = evaluate()

    assert (code, report["verdict"], report["exit_status"]) == (0, "GO", 0)
    assert report["mode"] == "stored" and "simulated vectors" in report["mode_why"]
    neighbours = report["neighbours"]
    assert neighbours["change"]["n"] >= 100 and neighbours["old"]["recall_at_10"]["value"] < 0.2
    assert neighbours["new"]["recall_at_10"]["value"] > neighbours["old"]["recall_at_10"]["value"] + 0.2
    assert {entry["slice"] for entry in neighbours["slices"]} == {"video type", "speaker", "length"}
    assert report["health"]["new"]["problems"] == [] and report["rows"]["judged"] == COUNT - 1  # one blank
    assert report["latency"]["new"]["curve"]["index"] == "segments_embedding_384_hnsw"
    assert [p["ef_search"] for p in report["latency"]["new"]["curve"]["points"]] == [20, 40, 100, 200]
    recorded = SwitchEvent.objects.filter(step="eval").latest("at")
    assert recorded.details["verdict"] == "GO" and recorded.details["report"]["neighbours"] == neighbours
    # The last verdict, where the operator looks.
    found = status.collect()["evaluation"]
    assert found["verdict"] == "GO" and found["event"] == recorded.pk
    assert "Evaluation: GO (stored mode" in _command("embedding_status")
    checks = verify(sample=20, encoder=ENCODERS["topical"]).as_dict()["checks"]
    assert checks["evaluation"]["verdict"] == "GO" and checks["degenerate"]["ok"] is True
    html = admin_client.get(SWITCH_PAGE).content.decode()
    assert 'id="switch-evaluation"' in html and '<span class="pill ok">GO</span>' in html and "<svg" in html


def test_collapsed_vectors_are_a_no_go_the_swap_refuses_changing_nothing_unless_the_regression_is_accepted(
        expanded, admin_client):
    encoder = expanded("collapsed")
    before = vector_column_types()

    with pytest.raises(CommandError, match="Swap refused, nothing changed") as refused:
        call_command("embedding_switch", "swap", encoder=encoder, stdout=StringIO())

    assert "NO-GO" in str(refused.value) and "collapsed" in str(refused.value) and "--accept-regression" in str(
        refused.value)
    assert embedding_schema().phase == "expanded" and vector_column_types() == before
    assert not SwitchEvent.objects.filter(step="swap").exists()
    assert SwitchEvent.objects.get(step="eval").details["by"] == "embedding_switch swap"  # it ran the evaluation itself
    code, report = evaluate()
    assert (code, report["verdict"]) == (1, "NO-GO")
    assert any("collapsed" in reason and "embedding_384" in reason for reason in report["reasons"])
    assert report["health"]["new"]["median_distance"] < 0.05 and report["health"]["old"]["problems"] == []
    found = status.collect()
    assert found["evaluation"]["verdict"] == "NO-GO" and found["swap"]["accepted"] is False
    assert found["swap"]["refusal"].startswith("the last evaluation (stored mode) says NO-GO: segments.embedding_384's")
    assert '<span class="pill bad">NO-GO</span>' in admin_client.get(SWITCH_PAGE).content.decode()
    checks = verify(sample=20, encoder=encoder).as_dict()["checks"]
    assert checks["degenerate"]["ok"] is False and "collapsed" in checks["degenerate"]["message"]

    call_command("embedding_switch", "swap", "--accept-regression", encoder=encoder, stdout=StringIO())

    assert embedding_schema().phase == "swapped"
    accepted = SwitchEvent.objects.get(step="eval-accepted")
    assert accepted.details["eval"] == SwitchEvent.objects.filter(step="eval").latest("at").pk
    assert status.collect()["evaluation"]["verdict"] == "NO-GO"  # the verdict follows the models through the swap


def test_with_nothing_to_compare_or_a_bad_option_it_exits_2_naming_the_fix(segments_at, tmp_path):
    with pytest.raises(CommandError, match="Nothing to compare: the switch is complete") as final:
        call_command("embedding_eval", stdout=StringIO(), stderr=StringIO())
    assert final.value.returncode == 2

    segments_at("expanded")
    call_command("load_demo_segments", count=20, stdout=StringIO())
    with pytest.raises(CommandError, match="No segment has both vectors yet.*backfill_embeddings") as empty:
        call_command("embedding_eval", stdout=StringIO(), stderr=StringIO())
    assert empty.value.returncode == 2

    with pytest.raises(CommandError, match="--ef-search 'many'") as bad:
        call_command("embedding_eval", "--ef-search", "many", stdout=StringIO())
    assert bad.value.returncode == 2
    labelled = tmp_path / "labelled.csv"
    labelled.write_text("question,answers\nDoes red meat raise LDL?,\n")
    with pytest.raises(CommandError, match="entry 1 needs a question and at least one answer.*question,answers") as lab:
        call_command("embedding_eval", "--labelled", str(labelled), stdout=StringIO())
    assert lab.value.returncode == 2


def test_labelled_questions_are_judged_by_the_moments_that_answer_them(expanded, tmp_path):
    encoder = expanded("topical")
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, video_id, start_sec, text FROM segments WHERE text ~ '^[A-Za-z]' "
                       "ORDER BY id LIMIT 40")
        rows = cursor.fetchall()
    labelled = tmp_path / "labelled.csv"
    labelled.write_text("question,answers\n" + "".join(
        f"\"{text.split('.')[0]}\",{video}@{start + 0.5:.1f}\n" if i % 2 else f"\"{text.split('.')[0]}\",{pk}\n"
        for i, (pk, video, start, text) in enumerate(rows)))

    code, report = evaluate("--labelled", str(labelled), encoder=encoder)

    labelled_figures = report["queries"]["labelled"]
    assert labelled_figures["n"] == 40 and labelled_figures["asked"] == 40
    assert "change" not in labelled_figures  # stored mode: the old model cannot run, the new side is reported
    assert labelled_figures["new"]["recall_at_10"]["value"] > 0.3
    missing = tmp_path / "missing.csv"
    missing.write_text("question,answers\nwhere is it,NoSuchVideo@12\n")
    with pytest.raises(CommandError, match="No segment answers 'where is it'.*NoSuchVideo@12"):
        call_command("embedding_eval", "--labelled", str(missing), stdout=StringIO(), stderr=StringIO())


def _command(*args):
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_a_partial_backfill_is_judged_on_the_segments_that_have_both_vectors(expanded):
    expanded("topical")
    with connection.cursor() as cursor:
        cursor.execute("UPDATE segments SET embedding_384 = NULL WHERE id % 2 = 0")
        cursor.execute("SELECT count(*) FROM segments WHERE embedding_384 IS NOT NULL")
        (both,) = cursor.fetchone()

    code, report = evaluate()

    assert report["rows"]["judged"] == both and 0.4 < report["rows"]["share"] < 0.6
    assert report["neighbours"]["pool"] == both and report["verdict"] in ("GO", "INCONCLUSIVE")


def write_old_column(encoder):
    """The old column as `encoder` wrote it, recorded as its own in the model ledger."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, text FROM segments WHERE text ~ '[^[:space:]]' ORDER BY id")
        rows = cursor.fetchall()
        vectors = encoder.encode_documents([text for _, text in rows])
        literals = ["[" + ",".join(f"{x:.6f}" for x in vector) + "]" for vector in vectors]
        cursor.execute("UPDATE segments s SET embedding = v.vector::vector FROM unnest(%s::int[], %s::text[]) "
                       "AS v(id, vector) WHERE s.id = v.id", [[pk for pk, _ in rows], literals])
        ledger.retire(cursor, "segments", "embedding")
        ledger.record(cursor, "segments", "embedding", ledger.identity_of(encoder), "vector", "first write")


@pytest.fixture
def questions_users_asked():
    """The original project's log of questions (rag_requests.query_text), a few of them asked twice."""
    asked = [f"what about {subject} on a carnivore diet" for subject in SUBJECTS[:12]]
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE rag_requests (id serial PRIMARY KEY, request_type varchar(20) NOT NULL "
                       "DEFAULT 'search', query_text text NOT NULL, created_at timestamptz NOT NULL DEFAULT now())")
        cursor.execute("INSERT INTO rag_requests (query_text) SELECT unnest(%s::text[])", [asked + asked[:3]])
    yield asked
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE rag_requests")


def test_with_both_models_the_questions_users_asked_are_replayed_and_those_labelled_judged(
        expanded, questions_users_asked, tmp_path):
    new = expanded("topical")
    old = SubjectEncoder(noise=0.5, name="subjects-1536", dimensions=1536)
    write_old_column(old)
    with connection.cursor() as cursor:
        cursor.execute("SELECT id FROM segments WHERE text ~ 'ketosis' ORDER BY id LIMIT 1")
        (answer,) = cursor.fetchone()
    labelled = tmp_path / "labelled.json"
    labelled.write_text(json.dumps([{"question": question, "answers": [answer]}
                                    for question in questions_users_asked[:4]]))

    code, report = evaluate("--labelled", str(labelled), encoders={"old": old, "new": new})

    found = report["queries"]
    assert report["mode"] == "models" and found["logged_table"] == "rag_requests" and code == report["exit_status"]
    assert found["logged"]["n"] == len(questions_users_asked)
    assert 0 <= found["logged"]["agreement"]["overlap_at_10"] <= 1
    assert "change" not in found["logged"]  # nobody said what answers them: agreement only
    assert found["logged_judged"]["n"] == 4 and "change" in found["logged_judged"]
    assert found["known_item"]["n"] == 50 and found["known_item"]["agreement"]["n"] == 50
    summary = SwitchEvent.objects.filter(step="eval").latest("at").details["summary"]
    assert [entry["set"] for entry in summary["judged"]] == [
        "known-item queries", "labelled queries", "logged questions with labels"]


class FarLink:
    """An execute wrapper holding each statement `delay` seconds on the way out and on the way back, as the
    link to a database abroad does; it counts them."""

    def __init__(self, delay):
        self.delay, self.statements = delay, 0

    def __call__(self, execute, sql, params, many, context):
        self.statements += 1
        time.sleep(self.delay)
        try:
            return execute(sql, params, many, context)
        finally:
            time.sleep(self.delay)


def test_far_from_the_database_the_searches_cost_the_same_few_statements_and_their_times_leave_the_link_out(
        expanded):
    encoder = expanded("topical")
    has_iterative_scan()  # read once per process
    found = {}
    for queries in (40, 120):
        link = FarLink(0.05)  # a 100 ms round trip
        with connection.execute_wrapper(link):
            report = run.evaluate(options=dataclasses.replace(swap_options(), queries=queries),
                                  encoders={"new": encoder})
        found[queries] = link.statements, report

    assert found[40][0] == found[120][0] < 40  # 28 here; 4 a search when each search ran alone (over 500)
    for queries, (_, report) in found.items():
        known, skipped = report["queries"]["known_item"], report["budget"]["skipped"]
        assert (known["asked"], known["n"], skipped, report["verdict"]) == (queries, queries, 0, "GO")
        point = report["latency"]["new"]["curve"]["points"][0]
        assert point["n"] == 10 and point["p95_ms"] < 100  # the server's time, without the round trip


def test_a_batch_finds_what_the_application_finds_through_the_index_and_what_exact_search_finds(segments_at):
    segments_at("expanded")
    call_command("load_demo_segments", count=3000, seed=2, stdout=StringIO())
    run_backfill(ENCODERS["topical"])
    steps.index()
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE segments")
    column = table.column("embedding_384")
    questions = [f"what about {subject}" for subject in SUBJECTS[:12]] + [f"{a} and {b}" for a, b in
                                                                         zip(SUBJECTS, SUBJECTS[5:17])]
    vectors = ENCODERS["topical"].encode_queries(questions).astype(np.float16).astype(np.float32)  # halfvec's own

    for exact, scans in ((False, ["Index Scan using segments_embedding_384_hnsw on public.segments s",
                                  "Order By: (s.embedding_384 <=> u.v)"]),
                         (True, ["Seq Scan on public.segments s"])):
        with table.reading("default", 30) as cursor:
            plan = _plan(cursor, column, vectors, exact)
            found = searching.search_all(cursor, searching.Budget(60), vectors, column, exact=exact)

        assert all(scan in plan for scan in scans) and ("Index" in plan) is not exact
        assert "Output: u.v, u.n, clock_timestamp()" in plan  # once per question, as it comes out of unnest
        assert [sorted((hit[4], hit[0]) for hit in hits) for hits, _ in found] == [  # tied rows in either order
            sorted((row.distance, row.pk) for row in nearest(vector, k=10, column="embedding_384", ef_search=100,
                                                            exact=exact))
            for vector in vectors]
        assert all(0 < seconds < 1 for _, seconds in found)


def test_a_batch_the_statement_timeout_stops_is_counted_and_the_searches_go_on(expanded):
    expanded("topical")
    column = table.column("embedding_384")
    vectors = ENCODERS["topical"].encode_queries(SUBJECTS[:3])
    budget = searching.Budget(60)
    locker = psycopg2.connect(**connection.get_connection_params())
    with table.reading("default", 0.2) as cursor:
        with locker.cursor() as other:
            other.execute("LOCK TABLE segments IN ACCESS EXCLUSIVE MODE")  # every search waits past 0.2 s
            stopped = searching.search_all(cursor, budget, vectors, column)
        locker.rollback()
        found = searching.search_all(cursor, budget, vectors, column)  # the same transaction goes on
    locker.close()

    assert stopped == [None, None, None] and budget.timed_out == 3  # the first alone, then one at a time
    assert [len(hits) for hits, _ in found] == [10, 10, 10] and budget.skipped == 0


def _plan(cursor, column, vectors, exact):
    """EXPLAIN of a batch's search under its configuration's settings."""
    values = searching.settings_for(100, exact, searching.K)
    cursor.execute("SELECT " + ", ".join("set_config(%s, %s, true)" for _ in values),
                   [item for name, value in values.items() for item in (name, str(value))])
    cursor.execute(f"EXPLAIN (VERBOSE) {searching.search_sql(column)}", [searching.array_literal(vectors), searching.K])
    return "\n".join(row[0] for row in cursor.fetchall())
