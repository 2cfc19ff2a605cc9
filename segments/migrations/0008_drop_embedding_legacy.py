"""Phase 4 (contract): drop the old 1536-dim column.

The one irreversible step of the switch: after it, the swap can no longer be undone. Run by
`manage.py embedding_switch contract --confirm`, which first clears the legacy vectors in small
batches and vacuums (segments/switch/contract.py), so that the disk space comes back without a
long lock. Refused, changing nothing, while a view still selects the legacy column.
"""
from django.db import migrations

from segments.operations import DropLegacyColumn, IrreversibleStep, LockTimeoutMigration


class Migration(LockTimeoutMigration):
    operator_step = "contract"  # never run by a plain `migrate` (segments/switch/gate.py)
    switch = 1
    dependencies = [("segments", "0007_swap_embedding")]

    operations = [
        IrreversibleStep(
            database_operations=[
                # Irreversible on purpose: re-adding an empty column would not bring the data back.
                DropLegacyColumn(),
            ],
            state_operations=[
                migrations.RemoveIndex(model_name="segment", name="segments_embedding_legacy_idx"),
                migrations.RemoveField(model_name="segment", name="embedding_legacy"),
            ],
        ),
    ]
