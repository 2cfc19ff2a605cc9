"""The whole switch through the commands a user runs, on a small table, then its final state."""
import numpy as np
import pytest
from django.core.management import call_command
from django.db import connection

from segments.schema import embedding_schema
from segments.search import search
from tests.conftest import PHASES


@pytest.mark.slow
def test_the_switch_end_to_end(segments_at, use_minilm, minilm):
    segments_at("legacy")
    call_command("load_demo_segments", count=120, seed=7, verbosity=0)
    for step in ("expanded",):
        call_command("migrate", "segments", PHASES[step], verbosity=0)
    call_command("backfill_embeddings", batch_size=32, verbosity=0)
    call_command("migrate", "segments", PHASES["indexed"], verbosity=0)
    call_command("verify_embeddings", verbosity=0)
    call_command("migrate", "segments", PHASES["swapped"], verbosity=0)

    assert embedding_schema().phase == "swapped"
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, text, embedding::real[] FROM segments WHERE text ~ '[^[:space:]]' ORDER BY id")
        rows = cursor.fetchall()
        cursor.execute("SELECT count(*) FROM segments WHERE embedding IS NULL AND text ~ '[^[:space:]]'")
        assert cursor.fetchone() == (0,)
        cursor.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = 'segments_embedding_hnsw'::regclass")
        assert cursor.fetchone() == (True,)
    stored = np.array([np.asarray(vector, dtype=np.float32) for _, _, vector in rows])
    fresh = minilm.encode_documents([text for _, text, _ in rows])
    assert np.min(np.sum(stored * fresh, axis=1)) >= 0.999

    # A segment's own text, as a query, finds that segment first.
    texts = {segment_id: text for segment_id, text, _ in rows}
    distinct = [i for i, t in texts.items() if list(texts.values()).count(t) == 1 and len(t) < 500][:5]
    for segment_id in distinct:
        results = search(texts[segment_id], k=3)
        assert results[0].segment.id == segment_id
