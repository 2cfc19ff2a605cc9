"""`manage.py search_segments`: what the operator reads, in text and in JSON, and its errors."""
import json
from io import StringIO

import pytest
from django.db import connection
from django.core.management import call_command
from django.core.management.base import CommandError

from segments.models import Segment
from tests.db.vectors import MappedEncoder, record_hand_made, vec



ENCODER = MappedEncoder({"fasting": vec(1, 0)})


def rebuild_vector_index():
    """Rebuild the HNSW graph from this test's rows only (see tests/db/test_search.py)."""
    with connection.cursor() as cursor:
        cursor.execute("REINDEX INDEX segments_embedding_hnsw")


@pytest.fixture
def two_segments(db):
    near = Segment.objects.create(video_id="abc123", start_sec=3723.0, end_sec=3730.5, text="Fasting resets insulin.",
                                  speaker_label="Chaffee", video_type="interview", embedding=vec(1, 0))
    far = Segment.objects.create(video_id="xyz789", start_sec=5, end_sec=9, text="Plants fight back.",
                                 speaker_label="Guest", video_type="podcast", embedding=vec(0, 1))
    record_hand_made()
    rebuild_vector_index()
    return near, far


def run(*args, **options):
    out, err = StringIO(), StringIO()
    call_command("search_segments", *args, stdout=out, stderr=err, encoder=ENCODER, **options)
    return out.getvalue(), err.getvalue()


def test_prints_ranked_segments_with_video_timestamps_speaker_and_distance(two_segments):
    out, _ = run("fasting")

    lines = out.splitlines()
    assert "2 result(s) for 'fasting' from segments.embedding" in lines[0]
    assert lines[1].split() == ["1.", "distance", "0.0000", "video", "abc123", "1:02:03-1:02:10", "speaker", "Chaffee"]
    assert lines[2].strip() == "Fasting resets insulin."
    assert lines[3].split()[:6] == ["2.", "distance", "1.0000", "video", "xyz789", "0:00:05-0:00:09"]


def test_json_gives_one_object_with_every_field(two_segments):
    out, _ = run("fasting", "--k", "1", "--json")

    payload = json.loads(out)
    assert payload["column"] == "embedding" and payload["reranked"] is False and payload["notes"] == []
    assert payload["results"] == [{
        "rank": 1, "id": two_segments[0].pk, "video_id": "abc123", "start_sec": 3723.0, "end_sec": 3730.5,
        "speaker": "Chaffee", "video_type": "interview", "distance": pytest.approx(0.0, abs=1e-6),
        "rerank_score": None, "text": "Fasting resets insulin.",
    }]


@pytest.mark.parametrize("flag, value", [("--video", "xyz789"), ("--speaker", "Guest"), ("--video-type", "podcast")])
def test_filters_reach_the_search(two_segments, flag, value):
    out, _ = run("fasting", flag, value, "--json")

    assert [row["id"] for row in json.loads(out)["results"]] == [two_segments[1].pk]


def test_a_bad_request_is_a_command_error_naming_the_fix(two_segments):
    with pytest.raises(CommandError, match="between 1 and 1000"):
        run("fasting", "--ef-search", "0")


def test_before_phase_one_the_error_names_the_migration(segments_at):
    segments_at("legacy")

    with pytest.raises(CommandError, match=r"Apply phase 1 first: `manage.py migrate`"):
        run("fasting")
