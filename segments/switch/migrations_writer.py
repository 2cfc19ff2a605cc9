"""The next switch's migrations, written as `makemigrations` writes migrations (`manage.py makeswitch`).

A switch is five migrations of the segments app, shaped like the first switch's (0003-0008):

    NNNN_switch_K_expand          phase 1: `embedding_next` beside `embedding`, and the staleness
                                  trigger guarding both (a plain `migrate` applies it)
    NNNN_switch_K_pending_index   its partial index of pending rows, CONCURRENTLY (a plain migrate too)
    NNNN_switch_K_index           operator step: the HNSW index, CONCURRENTLY
    NNNN_switch_K_swap            operator step: `embedding_next` -> `embedding` -> `embedding_legacy`
                                  (backwards: the undo)
    NNNN_switch_K_contract        operator step: the legacy column dropped, for good

The next model's column is named `embedding_next` whatever its width, so that a switch between two
models of one width needs no other name; its width and type (`vector` or `halfvec`) are written
into the expand migration, from EMBEDDING_DIMENSIONS and EMBEDDING_STORAGE when it is written, so
the migration does the same wherever it runs. Preview them with `manage.py sqlmigrate segments
NNNN`; commit them with the code, deploy, and follow the runbook.
"""
from dataclasses import dataclass
from datetime import date
from importlib import import_module
from pathlib import Path

from django.db.migrations.loader import MigrationLoader

from segments.schema import HNSW_EF_CONSTRUCTION, HNSW_M, LIVE, NEXT, PREVIOUS, BLANK_TEXT_PATTERN

APP = "segments"


@dataclass(frozen=True)
class NextSwitch:
    """What the next switch's migrations say: its number, the model, its width and storage, and
    where the files go."""

    number: int  # the switch's number (the first is 1)
    first_migration: int  # the number of its first migration file
    after: str  # the app's last migration, which the expand depends on
    model: str
    dimensions: int
    storage: str

    def name(self, offset, kind):
        return f"{self.first_migration + offset:04d}_switch_{self.number}_{kind}"

    @property
    def names(self):
        return [self.name(offset, kind) for offset, kind in enumerate(KINDS)]


KINDS = ("expand", "pending_index", "index", "swap", "contract")


def next_switch(loader, model, dimensions, storage):
    """The NextSwitch after the switches the code holds (the first is 0003-0008)."""
    from segments.switch.gate import switches

    leaves = loader.graph.leaf_nodes(APP)
    if len(leaves) != 1:
        raise ValueError(f"the {APP} app has {len(leaves)} last migrations ({leaves}); run makemigrations --merge")
    after = leaves[0][1]
    return NextSwitch(max(switches(loader), default=1) + 1, int(after[:4]) + 1, after, model, int(dimensions), storage)


def directory():
    """Where the segments app's migrations are (MIGRATION_MODULES respected, as makemigrations does)."""
    module_name, _explicit = MigrationLoader.migrations_module(APP)
    return Path(import_module(module_name).__file__).parent


def render(switch):
    """{file name: its text} of the switch's five migrations."""
    values = {
        "number": switch.number, "model": switch.model, "dimensions": switch.dimensions, "storage": switch.storage,
        "live": LIVE, "next": NEXT, "previous": PREVIOUS, "m": HNSW_M, "ef": HNSW_EF_CONSTRUCTION,
        "blank": BLANK_TEXT_PATTERN, "today": date.today().isoformat(),
        **{kind: name for kind, name in zip(KINDS, switch.names)}, "after": switch.after,
    }
    return {f"{name}.py": TEMPLATES[kind].format(**values).lstrip() for kind, name in zip(KINDS, switch.names)}


def write(switch, root):
    """Write the switch's migrations into `root`; their paths."""
    paths = []
    for file_name, text in render(switch).items():
        path = Path(root) / file_name
        path.write_text(text)
        paths.append(path)
    return paths


HEADER = '''"""Switch {number}: to {model} ({dimensions} dims, {storage}), written by `manage.py makeswitch` on {today}.
'''

TEMPLATES = {
    "expand": HEADER + '''
Phase 1 (expand): the nullable `{next}` column beside `{live}`, and the staleness trigger guarding
both (a segment whose text changes loses both vectors). Both are instant whatever the table size,
under lock_timeout; the application's INSERTs and UPDATEs keep working unchanged. The table's size
is recorded, for the saving the contract reports. A plain `migrate` applies it, after the pre-flight.
"""
from django.db import migrations

import segments.fields
from segments import triggers
from segments.operations import LockTimeoutMigration, RecordSizeBefore


class Migration(LockTimeoutMigration):
    expands = True  # phase 1: `migrate` runs the pre-flight check before it (segments/switch/preflight.py)
    switch = {number}
    model = {model!r}
    dependencies = [("segments", "{after}")]

    operations = [
        migrations.AddField(
            model_name="segment",
            name="{next}",
            field=segments.fields.EmbeddingField(blank=True, dimensions={dimensions}, editable=False, null=True,
                                                 storage="{storage}"),
        ),
        migrations.RunSQL(triggers.create_sql("{live}", "{next}"), reverse_sql=triggers.create_sql("{live}")),
        RecordSizeBefore(switch={number}),
    ]
''',
    "pending_index": HEADER + '''
The partial index of the segments still waiting for a vector in `{next}`, built without blocking:
the backfill walks it, the swap counts it. A plain `migrate` applies it.
"""
from django.db import migrations, models
from django.db.models import Q

from segments.operations import AddIndexConcurrently


class Migration(migrations.Migration):
    atomic = False
    switch = {number}
    dependencies = [("segments", "{expand}")]

    operations = [
        AddIndexConcurrently(
            model_name="segment",
            index=models.Index(
                fields=["id"],
                name="segments_{next}_todo",
                condition=Q({next}__isnull=True) & ~Q(text__regex="{blank}"),
            ),
        ),
    ]
''',
    "index": HEADER + '''
Phase 3a: the HNSW index on `{next}`, built without blocking reads or writes (its operator class
follows the column's type). An operator step: `manage.py embedding_switch index` runs it.
"""
import pgvector.django
from django.db import migrations

from segments.operations import AddIndexConcurrently


class Migration(migrations.Migration):
    operator_step = "index"  # never run by a plain `migrate` (segments/switch/gate.py)
    atomic = False
    switch = {number}
    dependencies = [("segments", "{pending_index}")]

    operations = [
        AddIndexConcurrently(
            model_name="segment",
            index=pgvector.django.HnswIndex(
                ef_construction={ef}, fields=["{next}"], m={m}, name="segments_{next}_hnsw",
                opclasses=["vector_cosine_ops"],
            ),
        ),
    ]
''',
    "swap": HEADER + '''
Phase 3b: the guarded swap (segments/switch/swap.py): `{next}` becomes `{live}`, `{live}` becomes
`{previous}`, with their indexes, their entries in the model ledger and the staleness trigger.
Backwards, the undo. An operator step: `manage.py embedding_switch swap` (and `undo`) run it.
"""
import pgvector.django
from django.db import migrations, models
from django.db.models import Q

import segments.fields
from segments.operations import LockTimeoutMigration, SwapEmbedding


class Migration(LockTimeoutMigration):
    operator_step = "swap"  # never run by a plain `migrate` (segments/switch/gate.py)
    undo_step = "undo"
    switch = {number}
    dependencies = [("segments", "{index}")]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[SwapEmbedding(next_column="{next}")],
            state_operations=[
                migrations.RemoveIndex(model_name="segment", name="segments_{live}_hnsw"),
                migrations.RemoveIndex(model_name="segment", name="segments_{live}_todo"),
                migrations.RemoveIndex(model_name="segment", name="segments_{next}_hnsw"),
                migrations.RemoveIndex(model_name="segment", name="segments_{next}_todo"),
                migrations.RenameField(model_name="segment", old_name="{live}", new_name="{previous}"),
                migrations.RenameField(model_name="segment", old_name="{next}", new_name="{live}"),
                migrations.AlterField(
                    model_name="segment",
                    name="{live}",
                    field=segments.fields.EmbeddingField(blank=True, editable=False, null=True),
                ),
                migrations.AddIndex(
                    model_name="segment",
                    index=pgvector.django.HnswIndex(
                        ef_construction={ef}, fields=["{previous}"], m={m}, name="segments_{previous}_hnsw",
                        opclasses=["vector_cosine_ops"],
                    ),
                ),
                migrations.AddIndex(
                    model_name="segment",
                    index=models.Index(condition=Q({previous}__isnull=True) & ~Q(text__regex="{blank}"),
                                       fields=["id"], name="segments_{previous}_todo"),
                ),
                migrations.AddIndex(
                    model_name="segment",
                    index=pgvector.django.HnswIndex(
                        ef_construction={ef}, fields=["{live}"], m={m}, name="segments_{live}_hnsw",
                        opclasses=["vector_cosine_ops"],
                    ),
                ),
                migrations.AddIndex(
                    model_name="segment",
                    index=models.Index(condition=Q({live}__isnull=True) & ~Q(text__regex="{blank}"),
                                       fields=["id"], name="segments_{live}_todo"),
                ),
            ],
        ),
    ]
''',
    "contract": HEADER + '''
Phase 4 (contract): the replaced model's column dropped, the one irreversible step. Run by
`manage.py embedding_switch contract --confirm`, which first clears its vectors in small batches
and vacuums (segments/switch/contract.py), so the disk space comes back without a long lock.
"""
from django.db import migrations

from segments.operations import DropLegacyColumn, IrreversibleStep, LockTimeoutMigration


class Migration(LockTimeoutMigration):
    operator_step = "contract"  # never run by a plain `migrate` (segments/switch/gate.py)
    switch = {number}
    dependencies = [("segments", "{swap}")]

    operations = [
        IrreversibleStep(
            database_operations=[DropLegacyColumn()],
            state_operations=[
                migrations.RemoveIndex(model_name="segment", name="segments_{previous}_hnsw"),
                migrations.RemoveIndex(model_name="segment", name="segments_{previous}_todo"),
                migrations.RemoveField(model_name="segment", name="{previous}"),
            ],
        ),
    ]
''',
}
