"""What keeps the table current after (and during) a switch, at every phase of it.

- Segments inserted or edited are stamped in `segments_pending_since` and announced with
  `NOTIFY segments_embedding` (segments/triggers.py), for `backfill_embeddings --follow`.
- Backfill claims get a lease (`expires_at`, renewed by the worker's heartbeat) and the worker's
  heartbeat its mode, model, column and last batch: behind a pooler, a worker's database session
  says nothing about whether it is alive.
- The legacy column's model is declared in the model ledger (embeddings.VectorColumn): the
  original project's GTE-Qwen2-1.5B (settings.LEGACY_EMBEDDING_MODEL), which cannot run here.

This migration depends on phase 1 only, not on the operator steps, so a plain `migrate` applies
it whatever the phase of the switch; 0010 joins it to the end of the first switch.
"""
from django.conf import settings
from django.db import migrations, models

from segments import triggers
from segments.schema import LEGACY_DIMENSIONS, LIVE, PREVIOUS, TABLE


def declare_legacy_model(apps, schema_editor):
    """Record the original project's model for its 1536-dim column, unless a model is recorded."""
    from embeddings import ledger

    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            "SELECT a.attname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
            "WHERE a.attrelid = to_regclass(%s) AND a.attname = ANY(%s) AND NOT a.attisdropped "
            "AND t.typname = 'vector' AND a.atttypmod = %s",
            [TABLE, [LIVE, PREVIOUS], LEGACY_DIMENSIONS],
        )
        for (column,) in cursor.fetchall():
            identity = ledger.ModelIdentity(settings.LEGACY_EMBEDDING_MODEL, LEGACY_DIMENSIONS, None,
                                            "the original project's model", None, None)
            ledger.record(cursor, TABLE, column, identity, "vector", "declared")


class Migration(migrations.Migration):
    dependencies = [
        ("segments", "0005_unmapped_legacy_columns"),
        ("embeddings", "0003_vector_column"),
    ]

    operations = [
        migrations.AlterField(model_name="backfillclaim", name="worker_pid", field=models.IntegerField(null=True)),
        migrations.AlterField(model_name="backfillclaim", name="worker_started_at",
                              field=models.DateTimeField(null=True)),
        migrations.AddField(model_name="backfillclaim", name="worker_id",
                            field=models.UUIDField(help_text="the worker run (segments_backfill_worker) holding it",
                                                   null=True)),
        migrations.AddField(model_name="backfillclaim", name="expires_at",
                            field=models.DateTimeField(help_text="the lease: taken over after this", null=True)),
        migrations.AlterField(model_name="backfillworker", name="pid",
                              field=models.IntegerField(help_text="the writer's database session, as in pg_stat_activity",
                                                        null=True)),
        migrations.AlterField(model_name="backfillworker", name="backend_start", field=models.DateTimeField(null=True)),
        migrations.AddField(model_name="backfillworker", name="mode",
                            field=models.CharField(default="backfill", help_text="backfill, or follow (listen or poll)",
                                                   max_length=40)),
        migrations.AddField(model_name="backfillworker", name="model_name",
                            field=models.CharField(blank=True, default="", help_text="the model it embeds with",
                                                   max_length=500)),
        migrations.AddField(model_name="backfillworker", name="column",
                            field=models.CharField(blank=True, default="", help_text="the column it writes now",
                                                   max_length=63)),
        migrations.AddField(model_name="backfillworker", name="last_batch_at",
                            field=models.DateTimeField(blank=True, null=True)),
        migrations.AddField(model_name="backfillworker", name="last_batch_rows",
                            field=models.IntegerField(blank=True, null=True)),
        migrations.AddField(model_name="backfillworker", name="recent_rows_per_s",
                            field=models.FloatField(blank=True, help_text="over the last minute", null=True)),
        migrations.CreateModel(
            name="PendingSince",
            fields=[
                ("segment_id", models.IntegerField(primary_key=True, serialize=False)),
                ("since", models.DateTimeField()),
            ],
            options={"db_table": "segments_pending_since"},
        ),
        migrations.RunSQL(triggers.ARRIVAL_SQL, reverse_sql=triggers.DROP_ARRIVAL_SQL),
        migrations.RunPython(declare_legacy_model, migrations.RunPython.noop),
    ]
