"""The partial index of segments still waiting for a 384-dim vector, built without blocking.

The backfill walks it by id, and the swap's completeness check counts it instantly: it holds
only the rows that still need work, so it shrinks as the backfill goes.
"""
from django.db import migrations, models
from django.db.models import Q

from segments.operations import AddIndexConcurrently


class Migration(migrations.Migration):
    atomic = False

    dependencies = [("segments", "0003_embedding_384")]

    operations = [
        AddIndexConcurrently(
            model_name="segment",
            index=models.Index(
                fields=["id"],
                name="segments_embedding_384_todo",
                condition=Q(embedding_384__isnull=True) & ~Q(text__regex="^[[:space:]]*$"),
            ),
        ),
    ]
