"""Phase 3a: the HNSW index on the new column, built without blocking reads or writes.

Run it after the backfill (building over a filled column is several times faster than
maintaining the graph row by row). Watch it with:
    SELECT phase, blocks_done, blocks_total, tuples_done, tuples_total
    FROM pg_stat_progress_create_index;
"""
import pgvector.django
from django.db import migrations

from segments.operations import AddIndexConcurrently


class Migration(migrations.Migration):
    operator_step = "index"  # never run by a plain `migrate` (segments/switch/gate.py)
    switch = 1
    atomic = False

    dependencies = [("segments", "0005_unmapped_legacy_columns")]

    operations = [
        AddIndexConcurrently(
            model_name="segment",
            index=pgvector.django.HnswIndex(
                ef_construction=64,
                fields=["embedding_384"],
                m=16,
                name="segments_embedding_384_hnsw",
                opclasses=["vector_cosine_ops"],
            ),
        ),
    ]
