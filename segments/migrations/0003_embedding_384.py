"""Phase 1 (expand): the nullable 384-dim column, and the trigger that keeps it current.

The column is `vector(384)` or `halfvec(384)` as settings.EMBEDDING_STORAGE says when this runs
(segments/storage.py); the pre-flight refuses halfvec on a pgvector older than 0.7.

Both are instant whatever the table size (a nullable column without a default is a catalogue
change), and both run under lock_timeout. The application's existing INSERTs and UPDATEs keep
working unchanged. The table's size as the switch begins is recorded for the saving the contract
reports, in place of 0002's record (taken when 0002 was applied, perhaps before the table was
filled).
"""
from django.db import migrations

import segments.fields
from segments import triggers
from segments.operations import LockTimeoutMigration, RecordSizeBefore


class Migration(LockTimeoutMigration):
    expands = True  # phase 1: `migrate` runs the pre-flight check before it (segments/switch/preflight.py)
    switch = 1
    dependencies = [("segments", "0002_switch_bookkeeping")]

    operations = [
        migrations.AddField(
            model_name="segment",
            name="embedding_384",
            field=segments.fields.EmbeddingField(blank=True, dimensions=384, editable=False, null=True),
        ),
        migrations.RunSQL(triggers.create_sql("embedding_384"), reverse_sql=triggers.DROP_SQL),
        RecordSizeBefore(switch=1),
    ]
