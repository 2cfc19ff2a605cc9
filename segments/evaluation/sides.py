"""The two sides of an evaluation, and whether each model can run here.

    expanded   old: embedding (the live, replaced model)   new: the next model's column
    swapped    old: embedding_legacy                       new: embedding (live)

Each side's questions are embedded by the model the model ledger records for its column, as the
search embeds them (segments.search.reader_for): EMBEDDING_MODEL for the new column,
LEGACY_EMBEDDING_MODEL for the replaced one; another model is refused, never used instead. A model
"runs here" when it is a local directory or in the Hugging Face cache (an evaluation downloads
nothing unless asked to with `--mode models`), the ledger's check passes, and the column holds a
model's vectors (the demo's simulated legacy vectors have none).

The mode: `models` (both searches side by side, by questions) when both models run here; `stored`
(each column judged from its stored vectors, segments.evaluation.neighbours) when the old one does
not, as with the original GTE-Qwen2-1.5B on a machine without a large GPU.
"""
from dataclasses import dataclass

from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from embeddings import ledger
from segments.compare import nothing_to_compare
from segments.evaluation import table
from segments.schema import TABLE, embedding_schema

MODELS, STORED, AUTO = "models", "stored", "auto"


class EvaluationError(Exception):
    """The evaluation cannot run (nothing to compare, a model that does not fit, a bad option): exit 2."""


@dataclass
class Side:
    label: str
    column: table.Column
    entry: object = None  # the ledger's Entry for the column, or None
    encoder: object = None  # what embeds its questions, when it runs here
    problem: str | None = None  # why it does not

    def model_key(self):
        """What tells this model from another one: its name and fingerprint (or, undeclared, its width)."""
        if self.entry is None:
            return {"name": None, "fingerprint": None, "dimensions": self.column.dimensions, "source": None}
        identity = self.entry.identity
        return {"name": identity.name, "fingerprint": identity.short_fingerprint, "dimensions": identity.dimensions,
                "source": self.entry.source}

    def as_dict(self):
        described = str(self.entry.identity) if self.entry is not None else "no model recorded"
        return {"column": self.column.name, "type": self.column.type_name, "dimensions": self.column.dimensions,
                "model": described, **{f"model_{k}": v for k, v in self.model_key().items()},
                "runs_here": self.encoder is not None, "problem": self.problem}


def plan(using="default"):
    """(phase, old Side, new Side) without encoders; EvaluationError when the table holds one model's
    vectors only (SchemaNotReady without the table)."""
    schema = embedding_schema(using)
    if schema.compared is None:
        raise EvaluationError(nothing_to_compare(schema.phase).replace("The comparison", "The evaluation"))
    old, new = schema.compared  # the replaced model's column, then the next (or live) one's
    with connections[using].cursor() as cursor:
        entries = ledger.entries(cursor, TABLE)
    return (schema.phase,
            Side("old", table.Column(old, schema.legacy_storage, schema.legacy_dimensions), entries.get(old)),
            Side("new", table.Column(new, schema.vector_storage, schema.vector_dimensions), entries.get(new)))


def attach(side, using, encoder=None, download=False):
    """Give `side` the encoder that embeds its questions, or the reason it cannot (side.problem)."""
    from embeddings.encoder import is_here
    from segments.search import configured_model, reader_for

    if side.entry is not None and side.entry.source == "simulated":
        side.problem = f"segments.{side.column.name} holds simulated vectors: no model wrote them."
        return side
    candidate = encoder or configured_model(side.entry)
    name = getattr(candidate, "model_name", None)
    if encoder is None and not download and not is_here(name):
        side.problem = (f"{name} is not on this machine (not a local directory, not in the Hugging Face cache); "
                        "the evaluation downloads nothing unless run with --mode models.")
        return side
    try:
        side.encoder = reader_for(side.column.name, using, candidate, doing="the evaluation")
    except ImproperlyConfigured as exc:  # ModelMismatch, ModelUnavailable
        side.problem = str(exc)
    return side


def choose_mode(requested, old, new):
    """(mode, why) for the `requested` mode (auto, models, stored); EvaluationError when models cannot run."""
    if requested == STORED:
        return STORED, "asked for (--mode stored)"
    if old.encoder is not None and new.encoder is not None:
        return MODELS, "both models run here"
    if requested == MODELS:
        failing = old if old.encoder is None else new
        raise EvaluationError(f"--mode models: the {failing.label} model cannot run here: {failing.problem} "
                              "Run with --mode stored to judge both columns from their stored vectors.")
    failing = old if old.encoder is None else new
    return STORED, f"the {failing.label} model cannot run here: {failing.problem}"
