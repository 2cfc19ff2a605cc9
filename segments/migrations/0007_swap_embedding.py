"""Phase 3b of the first switch: the guarded swap. `embedding_384` becomes `embedding`, the legacy
column is kept as `embedding_legacy` (and this migration can be reversed) until 0008 drops it.

Refuses, changing nothing, while a segment with text lacks its new vector beyond what the operator's
command allows. See segments/switch/swap.py.
"""
import pgvector.django
from django.db import migrations, models
from django.db.models import Q

from segments.operations import LockTimeoutMigration, SwapEmbedding


class Migration(LockTimeoutMigration):
    operator_step = "swap"  # never run by a plain `migrate` (segments/switch/gate.py)
    undo_step = "undo"
    switch = 1
    dependencies = [
        ("segments", "0006_embedding_384_hnsw"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[SwapEmbedding(next_column="embedding_384")],
            state_operations=[
                migrations.RemoveIndex(model_name="segment", name="segments_embedding_idx"),
                migrations.RemoveIndex(model_name="segment", name="segments_embedding_384_hnsw"),
                migrations.RemoveIndex(model_name="segment", name="segments_embedding_384_todo"),
                migrations.RenameField(model_name="segment", old_name="embedding", new_name="embedding_legacy"),
                migrations.RenameField(model_name="segment", old_name="embedding_384", new_name="embedding"),
                migrations.AddIndex(
                    model_name="segment",
                    index=pgvector.django.IvfflatIndex(
                        fields=["embedding_legacy"], lists=100, name="segments_embedding_legacy_idx",
                        opclasses=["vector_l2_ops"],
                    ),
                ),
                migrations.AddIndex(
                    model_name="segment",
                    index=pgvector.django.HnswIndex(
                        ef_construction=64, fields=["embedding"], m=16, name="segments_embedding_hnsw",
                        opclasses=["vector_cosine_ops"],
                    ),
                ),
                migrations.AddIndex(
                    model_name="segment",
                    index=models.Index(
                        condition=Q(embedding__isnull=True) & ~Q(text__regex="^[[:space:]]*$"),
                        fields=["id"],
                        name="segments_embedding_todo",
                    ),
                ),
            ],
        ),
    ]
