"""Phase 3b: the guarded swap. `embedding` becomes the 384-dim column, the old one is kept as
`embedding_legacy` (and this migration can be reversed) until 0006 drops it.

Refuses, changing nothing, while any segment with text lacks its new vector. See segments/swap.py.
"""
import pgvector.django
from django.db import migrations, models
from django.db.models import Q

from segments.switch import swap
from segments.operations import LockTimeoutMigration


class Migration(LockTimeoutMigration):
    operator_step = "swap"  # never run by a plain `migrate` (segments/switch/gate.py)
    undo_step = "undo"
    dependencies = [
        ("segments", "0006_embedding_384_hnsw"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunPython(swap.swap, swap.unswap)],
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
