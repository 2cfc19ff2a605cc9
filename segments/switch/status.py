"""Where the switch stands: one view for `embedding_status`, `migrate` and the admin.

(Being written: a first version with the phase and the next command.)
"""
from segments.schema import SchemaNotReady, embedding_schema

NEXT = {
    "legacy": "`manage.py migrate` (phase 1: the new column; nothing else changes)",
    "expanded": "`manage.py backfill_embeddings`, then `manage.py embedding_switch index`",
    "swapped": "watch the new search serve; `manage.py embedding_switch contract --confirm` later, or "
               "`manage.py embedding_switch undo`",
    "final": "nothing: the switch is done",
}


def brief(using="default"):
    """A few lines for the end of `migrate`: the phase and the next command."""
    try:
        phase = embedding_schema(using).phase
    except SchemaNotReady as exc:
        return [str(exc)]
    return [f"phase: {phase}", f"next: {NEXT[phase]}"]
