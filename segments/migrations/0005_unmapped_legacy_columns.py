"""The model stops mapping the legacy columns the project never reads (state only).

The columns stay in the table, with their data, for the application that owns them. Not mapping
them is what lets the project serve a table whose history renamed or dropped some of them (the
original project renamed `speaker_confidence` to `speaker_conf`): Django never names them in
a query.
"""
from django.db import migrations

UNMAPPED = ["speaker_confidence", "avg_logprob", "compression_ratio", "no_speech_prob", "temperature_used", "metadata"]


class Migration(migrations.Migration):
    dependencies = [("segments", "0004_embedding_384_todo_index")]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.RemoveField(model_name="segment", name=name) for name in UNMAPPED],
        ),
    ]
