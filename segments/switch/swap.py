"""Phase 3b: make the new vectors the live `embedding` column, in one short locked step.

`swap()` refuses, changing nothing, unless every segment with non-blank text has its 384-dim
vector and nothing is quarantined. It checks once without the lock (to refuse early and
cheaply), takes the ACCESS EXCLUSIVE lock under lock_timeout, checks again under the lock (the
partial index of pending rows makes that instant), then renames columns, indexes and the
staleness trigger and commits. The lock is held for a few milliseconds whatever the table size.
"""
import logging
import time

from django.core.management.base import CommandError

from segments import triggers
from segments.operations import index_validity
from segments.schema import pending_sql

logger = logging.getLogger(__name__)

# (before the swap, after the swap)
COLUMNS = [("embedding", "embedding_legacy"), ("embedding_384", "embedding")]
INDEXES = [
    ("segments_embedding_idx", "segments_embedding_legacy_idx"),
    ("segments_embedding_384_hnsw", "segments_embedding_hnsw"),
    ("segments_embedding_384_todo", "segments_embedding_todo"),
]


class SwapRefused(CommandError):
    """The swap found work left to do; nothing was changed."""


def missing_vectors(cursor, column):
    """(segments with non-blank text and no vector in `column`, of which quarantined)."""
    cursor.execute(
        f"""
        SELECT count(*), count(q.segment_id) FROM segments s
        LEFT JOIN embeddings_quarantine q ON q.segment_id = s.id
        WHERE {pending_sql(column)}
        """
    )
    return cursor.fetchone()


def check_ready(schema_editor):
    with schema_editor.connection.cursor() as cursor:
        missing, quarantined = missing_vectors(cursor, "embedding_384")
    if missing:
        raise SwapRefused(
            f"Swap refused, nothing changed: {missing} segment(s) with text have no 384-dim "
            f"vector yet ({quarantined} of them quarantined). Run `manage.py backfill_embeddings` "
            "(`manage.py backfill_embeddings --retry-quarantined` for quarantined rows), check "
            "with `manage.py verify_embeddings`, then migrate again."
        )
    if index_validity(schema_editor, "segments_embedding_384_hnsw") is not True:
        raise SwapRefused(
            "Swap refused, nothing changed: the HNSW index segments_embedding_384_hnsw is "
            "missing or INVALID. Apply `manage.py migrate segments 0004` first."
        )


def _rename_columns(schema_editor, pairs):
    for old, new in pairs:
        schema_editor.execute(f"ALTER TABLE segments RENAME COLUMN {old} TO {new}")


def _rename_indexes(schema_editor, pairs):
    for old, new in pairs:
        schema_editor.execute(f"ALTER INDEX {old} RENAME TO {new}")


def _locked(schema_editor, steps):
    schema_editor.execute("LOCK TABLE segments IN ACCESS EXCLUSIVE MODE")
    started = time.perf_counter()
    steps()
    held_ms = (time.perf_counter() - started) * 1000
    logger.info("segments swap: ACCESS EXCLUSIVE lock held %.1f ms before commit", held_ms)
    return held_ms


def swap(apps, schema_editor):
    check_ready(schema_editor)

    def steps():
        check_ready(schema_editor)  # again, now that no writer can add a row without a vector
        _rename_columns(schema_editor, COLUMNS)
        _rename_indexes(schema_editor, INDEXES)
        schema_editor.execute(triggers.create_sql("embedding"))

    _locked(schema_editor, steps)


def unswap(apps, schema_editor):
    def steps():
        _rename_columns(schema_editor, [(new, old) for old, new in reversed(COLUMNS)])
        _rename_indexes(schema_editor, [(new, old) for old, new in INDEXES])
        schema_editor.execute(triggers.create_sql("embedding_384"))

    _locked(schema_editor, steps)
