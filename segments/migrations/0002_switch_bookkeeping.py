"""The switch's own bookkeeping, before anything touches `segments`.

- The backfill's quarantine and claims tables move into this app (state only: the tables,
  created by `embeddings.0001`, keep their names and rows).
- `segments_switch_event` records each step of the switch; the first entry is the size of the
  table before the switch (`pg_total_relation_size`: heap, TOAST and indexes), so the saving can
  be reported against what the operator paid for before.
- `segments_backfill_worker` holds each backfill worker's heartbeat (rows done, device), and the
  admin's "Embedding switch" page is a proxy of the events (no table).
"""
import uuid

from django.db import migrations, models

TABLE_SIZE = """
    SELECT pg_total_relation_size(c.oid), c.reltuples::bigint FROM pg_class c
    WHERE c.oid = to_regclass('segments')
"""


def record_size_before(apps, schema_editor):
    SwitchEvent = apps.get_model("segments", "SwitchEvent")
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(TABLE_SIZE)
        total_bytes, estimated_rows = cursor.fetchone()
    SwitchEvent.objects.using(schema_editor.connection.alias).create(
        step="before", details={"total_bytes": total_bytes, "estimated_rows": max(estimated_rows, 0)})


class Migration(migrations.Migration):
    dependencies = [
        ("segments", "0001_initial"),
        ("embeddings", "0001_initial"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="BackfillClaim",
                    fields=[
                        ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                        ("first_id", models.IntegerField()),
                        ("last_id", models.IntegerField()),
                        ("worker_pid", models.IntegerField()),
                        ("worker_started_at", models.DateTimeField()),
                        ("worker_name", models.CharField(help_text="host:pid of the worker process", max_length=255)),
                        ("claimed_at", models.DateTimeField(auto_now_add=True)),
                    ],
                    options={"db_table": "embeddings_backfill_claim"},
                ),
                migrations.CreateModel(
                    name="QuarantinedSegment",
                    fields=[
                        ("segment_id", models.IntegerField(primary_key=True, serialize=False)),
                        ("text_md5", models.UUIDField(help_text="md5 of the text that failed")),
                        ("reason", models.TextField()),
                        ("attempts", models.PositiveIntegerField(default=1)),
                        ("first_failed_at", models.DateTimeField(auto_now_add=True)),
                        ("last_failed_at", models.DateTimeField(auto_now=True)),
                    ],
                    options={"db_table": "embeddings_quarantine", "verbose_name": "quarantined segment"},
                ),
            ],
        ),
        migrations.CreateModel(
            name="SwitchEvent",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("step", models.CharField(max_length=40)),
                ("at", models.DateTimeField(auto_now_add=True)),
                ("details", models.JSONField(default=dict)),
            ],
            options={"db_table": "segments_switch_event", "ordering": ["at", "id"]},
        ),
        migrations.CreateModel(
            name="EmbeddingSwitch",
            fields=[],
            options={"verbose_name": "embedding switch", "verbose_name_plural": "embedding switch",
                     "proxy": True, "indexes": [], "constraints": []},
            bases=("segments.switchevent",),
        ),
        migrations.CreateModel(
            name="BackfillWorker",
            fields=[
                ("id", models.UUIDField(default=uuid.uuid4, editable=False, primary_key=True, serialize=False)),
                ("worker_name", models.CharField(help_text="host:pid of the worker process", max_length=255)),
                ("pid", models.IntegerField(help_text="the writer's database session, as in pg_stat_activity")),
                ("backend_start", models.DateTimeField()),
                ("device", models.CharField(blank=True, help_text="where the model runs", max_length=40, null=True)),
                ("rows_done", models.BigIntegerField(default=0)),
                ("started", models.DateTimeField()),
                ("updated", models.DateTimeField()),
                ("finished", models.DateTimeField(blank=True, null=True)),
            ],
            options={"db_table": "segments_backfill_worker"},
        ),
        migrations.RunPython(record_size_before, migrations.RunPython.noop),
    ]
