"""The `segments` table exactly as the Ask Dr Chaffee database has it before the model switch.

An existing database adopts the project with `manage.py migrate --fake-initial`.
"""
import pgvector.django
from django.db import migrations, models

import segments.fields
from segments.operations import CreateVectorExtension


class Migration(migrations.Migration):
    initial = True

    dependencies = []

    operations = [
        CreateVectorExtension(),
        migrations.CreateModel(
            name="Segment",
            fields=[
                ("id", segments.fields.SerialField(primary_key=True, serialize=False)),
                ("video_id", models.CharField(max_length=255)),
                ("start_sec", models.FloatField()),
                ("end_sec", models.FloatField()),
                ("text", models.TextField()),
                ("speaker_label", models.CharField(blank=True, max_length=50, null=True)),
                ("speaker_confidence", models.FloatField(blank=True, null=True)),
                ("embedding", pgvector.django.VectorField(blank=True, dimensions=1536, editable=False, null=True)),
                ("avg_logprob", models.FloatField(blank=True, null=True)),
                ("compression_ratio", models.FloatField(blank=True, null=True)),
                ("no_speech_prob", models.FloatField(blank=True, null=True)),
                ("temperature_used", models.FloatField(blank=True, null=True)),
                ("metadata", models.JSONField(blank=True, null=True)),
                ("created_at", segments.fields.TimestampField(db_default=segments.fields.CurrentTimestamp(), editable=False)),
                ("video_type", models.CharField(blank=True, max_length=20, null=True)),
            ],
            options={
                "db_table": "segments",
                "indexes": [
                    models.Index(fields=["video_id"], name="idx_segments_video_id"),
                    models.Index(fields=["speaker_label"], name="idx_segments_speaker_label"),
                    models.Index(fields=["video_id", "start_sec"], name="idx_segments_video_start"),
                    models.Index(fields=["video_type"], name="idx_segments_video_type"),
                    pgvector.django.IvfflatIndex(
                        fields=["embedding"], lists=100, name="segments_embedding_idx", opclasses=["vector_l2_ops"]
                    ),
                ],
            },
        ),
    ]
