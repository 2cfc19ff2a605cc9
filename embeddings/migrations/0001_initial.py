from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies = []

    operations = [
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
    ]
