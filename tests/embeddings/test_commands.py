"""`backfill_embeddings`, `embedding_quarantine` and the quarantine admin, as a user runs them."""
import json
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from embeddings.encoder import EmbeddingsService
from embeddings.fakes import HashingEncoder
from segments.models import BackfillClaim, QuarantinedSegment
from tests.conftest import MINILM_PATH
from tests.embeddings.conftest import add_segments, command, sentences, stored_vectors
from tests.embeddings.encoders import POISON_NAN, PoisonedEncoder, RecordingEncoder

pytestmark = pytest.mark.django_db(transaction=True)

REPORT_KEYS = {"rows_embedded", "rows_quarantined", "rows_remaining", "rows_blank", "seconds", "rows_per_second"}


def nothing_written():
    return (all(v is None for v in stored_vectors().values()) and not QuarantinedSegment.objects.exists()
            and not BackfillClaim.objects.exists())


def test_before_phase_1_the_command_names_the_migration_to_apply(segments_at):
    segments_at("legacy")
    encoder = RecordingEncoder()
    with pytest.raises(CommandError, match=r"Apply phase 1 first: `manage.py migrate`"):
        command("backfill_embeddings", encoder=encoder)
    assert encoder.calls == []


def test_the_json_report_is_one_object_with_the_documented_keys():
    add_segments(sentences(30) + [" "])
    out, _ = command("backfill_embeddings", "--json", "--batch-size", "7", encoder=HashingEncoder())
    report = json.loads(out)
    assert REPORT_KEYS <= report.keys()
    assert (report["rows_embedded"], report["rows_remaining"], report["rows_blank"]) == (30, 0, 1)
    assert report["rows_per_second"] > 0 and out.count("\n") == 1


def test_the_human_report_says_what_was_done():
    add_segments(sentences(12))
    out, _ = command("backfill_embeddings", encoder=HashingEncoder())
    assert "Embedded 12 segment(s) into segments.embedding" in out
    assert "Left without a vector: 0 (0 quarantined)" in out


def test_limit_leaves_the_rest_for_the_next_run_and_says_so():
    add_segments(sentences(12))
    out, _ = command("backfill_embeddings", "--limit", "5", encoder=HashingEncoder())
    assert "7 segment(s) still need a vector: --limit was reached. Run `manage.py backfill_embeddings` again." in out


def test_dry_run_writes_nothing_and_loads_no_model(settings):
    settings.EMBEDDING_MODEL = "/nowhere/no-such-model"  # loading it would fail
    add_segments(sentences(3) + ["", "\t"])
    out, _ = command("backfill_embeddings", "--dry-run")
    assert "Would embed: 3 segment(s)" in out and "Blank text (never embedded): 2" in out
    assert "segments.embedding (384 dims, phase final)" in out and "/nowhere/no-such-model" in out
    plan = json.loads(command("backfill_embeddings", "--dry-run", "--json")[0])
    assert (plan["rows_to_embed"], plan["rows_blank"], plan["column"]) == (3, 2, "embedding")
    assert nothing_written()


@pytest.mark.slow
def test_a_model_of_the_wrong_width_is_refused_naming_both_numbers():
    add_segments(sentences(3))
    model = EmbeddingsService(model_name=MINILM_PATH, device="cpu", dimensions=768, query_instruction="")
    with pytest.raises(CommandError, match="produces 384-dim vectors but EMBEDDING_DIMENSIONS is 768"):
        command("backfill_embeddings", encoder=model)
    with pytest.raises(CommandError, match="512-dim vectors but segments.embedding holds 384"):
        command("backfill_embeddings", encoder=HashingEncoder(512))
    assert nothing_written()


def test_a_quarantined_row_is_listed_retried_and_reported_by_the_exit_status():
    ids = add_segments(sentences(5) + [f"{POISON_NAN} row"])
    with pytest.raises(CommandError, match="embedding_quarantine.*--retry-quarantined") as error:
        command("backfill_embeddings", encoder=PoisonedEncoder())
    assert error.value.returncode == 3

    listing, _ = command("embedding_quarantine")
    assert str(ids[5]) in listing and "vector contains NaN or Inf" in listing
    (entry,) = json.loads(command("embedding_quarantine", "--json")[0])["quarantined"]
    assert (entry["segment_id"], entry["attempts"]) == (ids[5], 1)

    with pytest.raises(CommandError):  # skipped, still quarantined
        command("backfill_embeddings", encoder=PoisonedEncoder())
    out, _ = command("backfill_embeddings", "--retry-quarantined", "--json", encoder=HashingEncoder())
    assert json.loads(out)["rows_embedded"] == 1
    assert stored_vectors()[ids[5]] is not None
    assert command("embedding_quarantine")[0].strip() == "No segment is quarantined."


def test_embedding_quarantine_retry_releases_entries_for_the_next_backfill():
    ids = add_segments([f"{POISON_NAN} one", f"{POISON_NAN} two"])
    with pytest.raises(CommandError):
        command("backfill_embeddings", encoder=PoisonedEncoder())
    out, _ = command("embedding_quarantine", str(ids[0]), "--retry")
    assert "Released 1 quarantined segment(s)" in out
    assert list(QuarantinedSegment.objects.values_list("segment_id", flat=True)) == [ids[1]]
    with pytest.raises(CommandError):
        command("backfill_embeddings", encoder=HashingEncoder())  # ids[1] is still quarantined
    assert stored_vectors()[ids[0]] is not None and stored_vectors()[ids[1]] is None


def test_the_admin_retry_action_releases_the_selected_entries(admin_client):
    ids = add_segments([f"{POISON_NAN} one", f"{POISON_NAN} two"])
    with pytest.raises(CommandError):
        command("backfill_embeddings", encoder=PoisonedEncoder())
    page = admin_client.get("/admin/segments/quarantinedsegment/")
    assert page.status_code == 200 and b"vector contains NaN or Inf" in page.content
    response = admin_client.post("/admin/segments/quarantinedsegment/",
                                 {"action": "retry", "_selected_action": [ids[1]]}, follow=True)
    assert b"Released 1 quarantined segment(s)" in response.content
    assert list(QuarantinedSegment.objects.values_list("segment_id", flat=True)) == [ids[0]]


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1."),
    (["--limit", "-1"], "--limit must be at least 0."),
    (["--workers", "0"], "--workers must be at least 1."),
    (["--workers", "2"], "use --workers 1"),
])
def test_bad_options_are_refused_with_the_fix(args, message):
    with pytest.raises(CommandError, match=message):
        command("backfill_embeddings", *args, encoder=HashingEncoder())


class Terminal(StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_a_progress_bar_shows_rows_per_second():
    add_segments(sentences(40))
    stderr = Terminal()
    call_command("backfill_embeddings", "--batch-size", "10", encoder=HashingEncoder(), stdout=StringIO(),
                 stderr=stderr)
    assert "40/40" in stderr.getvalue() and "rows/s" in stderr.getvalue()


def test_without_a_terminal_or_with_json_there_is_no_progress_bar():
    add_segments(sentences(40))
    _, err = command("backfill_embeddings", "--batch-size", "10", encoder=HashingEncoder())
    assert err == ""
