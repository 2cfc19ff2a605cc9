"""Bookkeeping a plain `migrate` applies at any phase of a switch (it depends on phase 1 only; 0012
joins it to the end of the first switch):

- each worker's heartbeat gains its measured round trip to the database, the batches it has in
  flight, and why it holds its writes back when it does (a pause, a replica's lag, a rate cap);
- `segments_switch_pause`: the operator's pause of the switch's bulk writes, on every machine at once.
"""
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("segments", "0009_embedding_on_arrival")]

    operations = [
        migrations.AddField(model_name="backfillworker", name="round_trip_ms",
                            field=models.FloatField(blank=True, help_text="its measured round trip to the database",
                                                    null=True)),
        migrations.AddField(model_name="backfillworker", name="batches_in_flight",
                            field=models.IntegerField(blank=True, help_text="batches sent and not yet committed",
                                                      null=True)),
        migrations.AddField(model_name="backfillworker", name="waiting_for",
                            field=models.CharField(blank=True, default="", db_default="", max_length=300,
                                                   help_text="why it holds its writes back now (paused, a replica's "
                                                             "lag, a rate cap)")),
        migrations.CreateModel(
            name="SwitchPause",
            fields=[
                ("scope", models.CharField(default="all", max_length=20, primary_key=True, serialize=False)),
                ("reason", models.TextField(blank=True, default="")),
                ("paused_by", models.CharField(blank=True, default="", help_text="host:pid of the command",
                                               max_length=255)),
                ("paused_at", models.DateTimeField()),
            ],
            options={"db_table": "segments_switch_pause"},
        ),
    ]
