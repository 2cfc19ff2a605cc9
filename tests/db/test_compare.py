"""The old and the new search side by side (segments.compare), before the swap and after it, with
real models: MiniLM for the new column, a 1536-dim stand-in (MiniLM through a fixed random
projection) for the old one, written into the demo data by `load_demo_segments --legacy-model`.
Also `manage.py compare_search`, the demo loader's model ledger entries, `build_standin_model`,
and the admin's "Compare searches" page.
"""
import io
import json
from pathlib import Path

import numpy as np
import pytest
from django.contrib.auth.models import Permission
from django.core.management import call_command, execute_from_command_line
from django.core.management.base import CommandError
from django.db import connection

from embeddings import ledger
from embeddings.encoder import EmbeddingsService, get_service
from segments.compare import compare, rbo
from segments.search import SearchError
from segments.switch.backfill import run_backfill
from tests.conftest import MINILM_PATH, PHASES, migrate_segments

pytestmark = pytest.mark.slow

QUESTION = "Does red meat raise LDL cholesterol?"
QUESTIONS = ["Does red meat raise LDL cholesterol?", "how long does it take to adapt to ketosis",
             "can a meat-only diet help with depression"]
COUNT = 40  # texts embedded by each model (some seconds on a CPU)
EDGE_CASES_COUNT = 50  # from this many on, the demo has its edge cases (a blank segment, a very long one)
COMPARE_PAGE = "/admin/segments/embeddingswitch/compare/"
SWITCH_PAGE = "/admin/segments/embeddingswitch/"
GTE_QWEN2 = "Alibaba-NLP/gte-Qwen2-1.5B-instruct"


def recorded(column):
    with connection.cursor() as cursor:
        return ledger.entry(cursor, "segments", column)


def texts_by_id():
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, text FROM segments WHERE text ~ '[^[:space:]]' ORDER BY id")
        return dict(cursor.fetchall())


def ranked(encoder, question, texts, k=10):
    """The ids of the k texts nearest to `question` by `encoder`, computed here with numpy."""
    ids = list(texts)
    documents = encoder.encode_documents([texts[i] for i in ids])
    distances = 1 - documents @ encoder.encode_query(question)
    return [ids[i] for i in np.argsort(distances, kind="stable")[:k]]


@pytest.fixture(scope="module")
def legacy_model(standin):
    """The 1536-dim stand-in, as the old column's model (its path as load_demo_segments records it)."""
    return str(Path(standin(1536)).resolve())


@pytest.fixture
def legacy_service(legacy_model):
    """The stand-in's service, as the search and the loader get it (loaded once per process)."""
    return get_service(model_name=legacy_model, dimensions=1536)


def load_demo_with_both_models(segments_at, settings, legacy_model, minilm, phase="indexed", count=COUNT):
    """Demo segments at `phase`: the old column written by the stand-in (load_demo_segments
    --legacy-model), the new one backfilled with MiniLM; the settings name both models."""
    settings.LEGACY_EMBEDDING_MODEL = legacy_model
    segments_at(phase)
    call_command("load_demo_segments", count=count, seed=4, legacy_model=legacy_model, stdout=io.StringIO())
    run_backfill(minilm)


@pytest.fixture
def both_models(segments_at, settings, legacy_model, minilm, use_minilm):
    load_demo_with_both_models(segments_at, settings, legacy_model, minilm)


@pytest.fixture
def declared_legacy(segments_at, minilm, use_minilm, monkeypatch):
    """Before the swap, as the first switch leaves a deployment without GTE-Qwen2: the old column
    declared as the original project's model (which cannot be loaded here), the new one filled."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never a 1.5B download, whatever the network
    segments_at("indexed")
    call_command("load_demo_segments", count=COUNT, seed=4, no_legacy_vectors=True, stdout=io.StringIO())
    run_backfill(minilm)


def write_questions(tmp_path, lines):
    path = tmp_path / "questions.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# --- compare() ---------------------------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_before_and_after_the_swap_each_column_is_searched_with_its_own_model(
        both_models, legacy_model, legacy_service, minilm, settings):
    texts = texts_by_id()

    before = compare(QUESTION, k=10)

    assert (before.phase, before.old.column, before.new.column) == ("expanded", "embedding", "embedding_384")
    assert (before.old.setting, before.new.setting) == ("LEGACY_EMBEDDING_MODEL", "EMBEDDING_MODEL")
    assert (before.old.model_name, before.new.model_name) == (legacy_model, MINILM_PATH)
    assert before.complete and before.problem is None
    # Each question was embedded by its column's model: the rankings are those of numpy with each model.
    assert before.old.ids == ranked(legacy_service, QUESTION, texts)
    assert before.new.ids == ranked(minilm, QUESTION, texts)
    assert before.shared == set(before.old.ids) & set(before.new.ids)
    assert before.overlap == len(before.shared)
    assert before.rbo == pytest.approx(rbo(before.old.ids, before.new.ids))
    # The stand-in is MiniLM through a random projection, which keeps neighbours neighbours.
    assert before.overlap >= 5 and before.rbo > 0.5
    assert 0 < min(hit.distance for hit in before.old.results)

    migrate_segments(PHASES["swapped"])
    after = compare(QUESTION, k=10)

    assert (after.phase, after.old.column, after.new.column) == ("swapped", "embedding_legacy", "embedding")
    assert (after.old.model_name, after.new.model_name) == (legacy_model, MINILM_PATH)
    assert (after.old.ids, after.new.ids) == (before.old.ids, before.new.ids)  # the columns only moved
    assert (after.overlap, after.rbo) == (before.overlap, pytest.approx(before.rbo))

    settings.LEGACY_EMBEDDING_MODEL = "some-org/another-model"
    old = compare(QUESTION).old

    assert not old.ok and old.results is None
    assert legacy_model in old.problem and "No question was embedded" in old.problem
    assert "Set LEGACY_EMBEDDING_MODEL" in old.fix and "some-org/another-model" in old.fix


@pytest.mark.django_db(transaction=True)
def test_simulated_legacy_vectors_are_recorded_as_such_and_never_searched(segments_at, use_minilm):
    segments_at("indexed")
    call_command("load_demo_segments", count=COUNT, seed=4, stdout=io.StringIO())

    entry = recorded("embedding")
    assert (entry.source, entry.identity.dimensions, entry.identity.fingerprint) == ("simulated", 1536, None)
    old = compare(QUESTION).old
    assert not old.ok and "simulated" in old.problem
    assert "--legacy-model" in old.fix
    # The declaration it replaced (made when the column was empty) is kept as history.
    with connection.cursor() as cursor:
        history = ledger.history(cursor, "segments")
    assert [(e.identity.name, e.source, retired is not None) for e, retired in history
            if e.column == "embedding"] == [(GTE_QWEN2, "declared", True), ("random unit vectors", "simulated", False)]


@pytest.mark.django_db
def test_with_one_models_vectors_there_is_nothing_to_compare_and_the_question_is_checked():
    comparison = compare(QUESTION)

    assert comparison.phase == "final" and comparison.old is None and comparison.new is None
    assert comparison.problem.startswith("Nothing to compare") and not comparison.complete
    with pytest.raises(SearchError, match="empty"):
        compare("   ")
    with pytest.raises(SearchError, match="k=0"):
        compare(QUESTION, k=0)


# --- load_demo_segments --legacy-model, build_standin_model ----------------------------------

@pytest.mark.django_db(transaction=True)
def test_the_demo_loader_writes_the_models_vectors_records_it_and_mixes_no_models(
        segments_at, settings, legacy_model, legacy_service):
    settings.LEGACY_EMBEDDING_MODEL = legacy_model  # phase 1 declares it by name; the loader records the model
    segments_at("indexed")

    out = io.StringIO()
    call_command("load_demo_segments", count=EDGE_CASES_COUNT, seed=4, legacy_model=legacy_model, stdout=out)

    assert f"LEGACY_EMBEDDING_MODEL={legacy_model}" in out.getvalue()
    entry = recorded("embedding")
    assert (entry.identity.name, entry.source) == (legacy_model, "first write")
    assert entry.identity.fingerprint == ledger.identity_of(legacy_service).fingerprint
    with connection.cursor() as cursor:
        cursor.execute("SELECT text, embedding::real[] FROM segments ORDER BY id")
        rows = cursor.fetchall()
    assert len(rows) == EDGE_CASES_COUNT
    blank = [vector for text, vector in rows if not text.strip()]
    assert blank == [None]  # a blank text gets no vector
    written = [(text, vector) for text, vector in rows if text.strip()]
    stored = np.asarray([vector for _, vector in written], dtype=np.float32)
    fresh = legacy_service.encode_documents([text for text, _ in written])
    assert np.min(np.sum(stored * fresh, axis=1)) >= 0.999

    with pytest.raises(CommandError, match="already holds vectors of .*two models in one column"):
        call_command("load_demo_segments", count=5, stdout=io.StringIO())
    with pytest.raises(CommandError, match="writes 384-dim vectors but segments.embedding holds 1536"):
        call_command("load_demo_segments", count=5, legacy_model=MINILM_PATH, stdout=io.StringIO())


@pytest.mark.django_db(transaction=True)
def test_at_the_legacy_phase_the_loader_records_the_model_and_migrate_keeps_it(segments_at, legacy_model):
    segments_at("legacy")

    call_command("load_demo_segments", count=10, legacy_model=legacy_model, stdout=io.StringIO())
    call_command("migrate", verbosity=0)  # phase 1 declares the legacy model only where none is recorded

    entry = recorded("embedding")
    assert (entry.identity.name, entry.source) == (legacy_model, "first write")


def test_build_standin_model_writes_a_model_of_the_asked_width(tmp_path):
    out = io.StringIO()
    call_command("build_standin_model", str(tmp_path / "standin"), dimensions=24, seed=3, stdout=out)

    model = EmbeddingsService(model_name=str(tmp_path / "standin"), device="cpu", dimensions=24, query_instruction="")
    assert model.encode_documents(["fasting and insulin"]).shape == (1, 24)
    assert "projected to 24 dims, seed 3" in model.description
    assert "LEGACY_EMBEDDING_MODEL=" in out.getvalue()
    with pytest.raises(CommandError, match="not an empty directory"):
        call_command("build_standin_model", str(tmp_path / "standin"), dimensions=24, stdout=io.StringIO())


# --- manage.py compare_search ----------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_the_command_prints_each_questions_overlap_and_rbo_and_the_means(both_models, tmp_path, monkeypatch):
    path = write_questions(tmp_path, ["# the demo's questions", "", *QUESTIONS[:2], "   "])
    expected = [compare(question, k=5) for question in QUESTIONS[:2]]

    out = io.StringIO()
    call_command("compare_search", path, k=5, stdout=out)
    lines = out.getvalue().splitlines()

    assert lines[0].startswith("old: segments.embedding, ") and lines[1].startswith("new: segments.embedding_384, ")
    for comparison in expected:
        line = next(line for line in lines if line.endswith(comparison.question))
        assert f"{comparison.overlap}/5" in line and f"{comparison.rbo:.3f}" in line
    mean = lines[-1].split()
    assert mean[0] == "mean" and mean[1] == f"{sum(c.overlap for c in expected) / 2:.1f}/5"
    assert mean[2] == f"{sum(c.rbo for c in expected) / 2:.3f}" and "over 2 question(s)" in lines[-1]

    monkeypatch.setattr("sys.stdin", io.StringIO(QUESTIONS[2] + "\n"))
    out = io.StringIO()
    call_command("compare_search", "-", k=5, json=True, stdout=out)
    report = json.loads(out.getvalue())

    assert (report["phase"], report["k"], report["p"]) == ("expanded", 5, 0.9)
    assert report["old"]["column"] == "embedding" and report["new"]["model"] == MINILM_PATH
    (only,) = report["questions"]
    direct = compare(QUESTIONS[2], k=5)
    assert only["question"] == QUESTIONS[2] and [hit["id"] for hit in only["old"]] == direct.old.ids
    assert (only["overlap"], only["shared"]) == (direct.overlap, sorted(direct.shared))
    assert only["rbo"] == pytest.approx(direct.rbo) and report["mean_rbo"] == pytest.approx(direct.rbo)


@pytest.mark.django_db
def test_the_command_refuses_what_it_cannot_compare(tmp_path):
    with pytest.raises(CommandError, match="Nothing to compare"):
        call_command("compare_search", write_questions(tmp_path, QUESTIONS[:1]), stdout=io.StringIO())
    with pytest.raises(CommandError, match="holds no question"):
        call_command("compare_search", write_questions(tmp_path, ["# only a comment", ""]), stdout=io.StringIO())
    with pytest.raises(CommandError, match="Cannot read"):
        call_command("compare_search", str(tmp_path / "missing.txt"), stdout=io.StringIO())
    with pytest.raises(CommandError, match="--k 0"):
        call_command("compare_search", write_questions(tmp_path, QUESTIONS[:1]), k=0, stdout=io.StringIO())


# --- the admin's "Compare searches" page -----------------------------------------------------

@pytest.mark.django_db
def test_only_staff_with_the_switch_pages_permission_see_it(client, django_user_model):
    assert client.get(COMPARE_PAGE).url.startswith("/admin/login/")
    user = django_user_model.objects.create_user("operator", password="a-long-password-1", is_staff=True)
    client.force_login(user)
    assert client.get(COMPARE_PAGE).status_code == 403

    user.user_permissions.add(Permission.objects.get(codename="view_embeddingswitch"))
    response = client.get(COMPARE_PAGE)

    assert response.status_code == 200 and b"Nothing to compare" in response.content  # the final phase


def test_the_switch_page_links_to_it(admin_client):
    assert f'href="{COMPARE_PAGE}"' in admin_client.get(SWITCH_PAGE).content.decode()


@pytest.mark.django_db(transaction=True)
def test_the_page_shows_both_lists_the_shared_segments_and_the_overlap_and_never_an_error_page(
        both_models, admin_client, monkeypatch):
    comparison = compare(QUESTION)

    response = admin_client.get(COMPARE_PAGE, {"q": QUESTION})
    page = response.content.decode()

    assert response.status_code == 200
    assert response.context["comparison"].old.ids == comparison.old.ids
    sides = {item["side"].label: item["rows"] for item in response.context["sides"]}
    assert [row["id"] for row in sides["old"]] == comparison.old.ids
    assert [row["id"] for row in sides["new"]] == comparison.new.ids
    assert {row["id"] for row in sides["old"] if row["other_rank"]} == comparison.shared
    assert page.count('class="hit shared"') == 2 * comparison.overlap
    assert f"{comparison.overlap} <span>of 10</span>" in page and f"{comparison.rbo:.3f}" in page
    assert 'id="compare-old"' in page and 'id="compare-new"' in page
    first = sides["new"][0]
    assert "https://www.youtube.com/watch?v=" in first["url"] and first["time"].startswith("0:")

    # Whatever fails becomes a message, never an error page.
    def broken(*args, **kwargs):
        raise RuntimeError("the database went away")

    monkeypatch.setattr("segments.compare_admin.compare", broken)
    response = admin_client.get(COMPARE_PAGE, {"q": QUESTION})

    assert response.status_code == 200
    assert "The comparison could not run: RuntimeError: the database went away" in response.content.decode()
    assert admin_client.get(COMPARE_PAGE, {"q": "   "}).status_code == 200  # an empty question: just the form


# --- without the legacy model ------------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_without_the_legacy_model_each_says_what_it_needs_and_the_new_search_still_runs(
        declared_legacy, admin_client, tmp_path, capsys):
    comparison = compare(QUESTION, k=5)

    old, new = comparison.old, comparison.new
    assert recorded("embedding").identity.name == GTE_QWEN2 and recorded("embedding").source == "declared"
    assert not old.ok and old.results is None and GTE_QWEN2 in old.problem
    assert f"LEGACY_EMBEDDING_MODEL (now '{GTE_QWEN2}')" in old.fix and "model ledger records" in old.fix
    assert new.ok and len(new.results) == 5
    assert not comparison.complete and comparison.overlap is None and comparison.rbo is None

    # The command: a non-zero exit, and the same reason and fix.
    with pytest.raises(SystemExit) as exited:
        execute_from_command_line(["manage.py", "compare_search", write_questions(tmp_path, QUESTIONS[:1])])

    out, err = capsys.readouterr()
    assert exited.value.code == 1 and out == ""
    assert "The old search (segments.embedding) cannot run" in err
    assert f"LEGACY_EMBEDDING_MODEL (now '{GTE_QWEN2}')" in err and "model ledger records" in err

    # The page: the reason and the fix where the old list would be, and the new list.
    response = admin_client.get(COMPARE_PAGE, {"q": QUESTION})
    page = response.content.decode()

    assert response.status_code == 200
    assert "This search cannot run" in page and "LEGACY_EMBEDDING_MODEL" in page and GTE_QWEN2 in page
    sides = {item["side"].label: item["rows"] for item in response.context["sides"]}
    assert sides["old"] == [] and len(sides["new"]) == 10
    assert "No overlap figures" in page
