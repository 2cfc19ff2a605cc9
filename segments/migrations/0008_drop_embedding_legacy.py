"""Phase 4 (contract): drop the old 1536-dim column and its IVFFlat index.

The one irreversible step of the switch: after it, the swap can no longer be undone. Apply it
once the new search has served for long enough to trust it.
"""
from django.db import migrations

from segments.operations import IrreversibleStep, LockTimeoutMigration


class Migration(LockTimeoutMigration):
    operator_step = "contract"  # never run by a plain `migrate` (segments/switch/gate.py)
    dependencies = [("segments", "0007_swap_embedding")]

    operations = [
        IrreversibleStep(
            database_operations=[
                # Irreversible on purpose: re-adding an empty column would not bring the data back.
                migrations.RunSQL("ALTER TABLE segments DROP COLUMN embedding_legacy"),
            ],
            state_operations=[
                migrations.RemoveIndex(model_name="segment", name="segments_embedding_legacy_idx"),
                migrations.RemoveField(model_name="segment", name="embedding_legacy"),
            ],
        ),
    ]
