"""Joins the end of the first switch (0008) and 0009, which a plain `migrate` applies at any phase.

State only: the live `embedding` column's width is the live model's, which each switch's own
migrations decide and the model ledger records; the model (segments.models.Segment) declares
no width.
"""
from django.db import migrations

import segments.fields


class Migration(migrations.Migration):
    dependencies = [
        ("segments", "0008_drop_embedding_legacy"),
        ("segments", "0009_embedding_on_arrival"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="segment",
                    name="embedding",
                    field=segments.fields.EmbeddingField(blank=True, editable=False, null=True),
                ),
            ],
        ),
    ]
