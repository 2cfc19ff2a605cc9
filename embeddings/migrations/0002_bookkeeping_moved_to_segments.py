"""The backfill's quarantine and claims tables now belong to the `segments` app (state only:
the tables and their rows stay as they are)."""
from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("embeddings", "0001_initial"),
        ("segments", "0002_switch_bookkeeping"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.DeleteModel(name="BackfillClaim"),
                              migrations.DeleteModel(name="QuarantinedSegment")],
        ),
    ]
