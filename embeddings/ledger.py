"""The model ledger: a vector column holds one model's vectors, and is searched with that model only.

Two models of the same width write vectors that fit the same column and mean nothing to each
other: a column half filled by one and half by the other ranks by meaningless distances, and a
question embedded with the wrong model finds nothing it should. So the table
`embeddings_vector_column` (embeddings.models.VectorColumn) records, for each vector column, the
model behind it, and:

- every writer of vectors checks its model against the column's **inside the transaction that
  writes**, after taking the table's write lock (`entry_for_writer`): a swap or an undo, which
  renames columns under a stronger lock, has then either committed or not begun, so a writer
  always writes into the column that holds its own model's vectors, whatever the phase, and never
  into another model's; the first write records the model;
- every search checks the model it embeds questions with (`check_reader`) before embedding one;
- the swap renames the entries with their columns (`rename`), and the contract retires the
  column it drops (`retire`).

Two models are told apart by their **fingerprint**: their vectors of a few fixed texts
(PROBE_TEXTS). The same model gives the same vectors to rounding on any machine (cosine 0.9999+
between fp16 on a GPU and fp32 on a CPU); another model, even of the same name and width (another
revision, another pooling), gives other vectors. A column written before this ledger existed is
adopted on evidence: a few of its stored vectors must match the model's vectors of their own
texts (`adopt`). A column whose model cannot run here (the original project's GTE-Qwen2-1.5B) is
declared by name, without a fingerprint.

Nothing here knows the `segments` table: callers name the table and, for adoption, read the
stored vectors.
"""
import hashlib
import json
from dataclasses import dataclass

import numpy as np
from django.core.exceptions import ImproperlyConfigured

PROBE_TEXTS = (
    "Does eating red meat raise LDL cholesterol?",
    "Fasting for three days lowered my blood sugar.",
    "The interview was recorded in a studio in Texas.",
)
SAME_MODEL_COSINE = 0.999  # fingerprints of one model agree to this (fp16 against fp32: 0.9999+)
EVIDENCE_COSINE = 0.99  # a stored vector against a fresh one of its text (halfvec rounding included)
EVIDENCE_ROWS = 8

LEDGER = "embeddings_vector_column"
SCHEMA_OF = ("(SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
             "WHERE c.oid = to_regclass(%(table)s))")
UNDEFINED_TABLE = "42P01"
FIELDS = ("id, column_name, model_name, description, fingerprint, dimensions, storage, normalized, "
          "query_instruction, source, recorded_at")


class ModelMismatch(ImproperlyConfigured):
    """A model was asked to write into, or search, a column that holds another model's vectors."""


class LedgerMissing(ImproperlyConfigured):
    """The ledger's table does not exist yet: this code runs on a database its migrations never reached."""


def _read(cursor, sql, params):
    """`sql` (one message: statements ahead of the ledger's read, the read last); LedgerMissing, naming the
    fix, when the ledger's table does not exist yet (the read fails, no look at the catalogue first: in a
    caller's transaction, that transaction is then aborted, as after any error)."""
    try:
        cursor.execute(sql, params)
    except Exception as exc:
        if UNDEFINED_TABLE in (getattr(exc, "pgcode", None), getattr(exc.__cause__, "pgcode", None)):
            raise LedgerMissing(f"The model ledger ({LEDGER}) does not exist in this database: "
                                "run `python manage.py migrate`.") from None
        raise
    return cursor.fetchall()


@dataclass(frozen=True)
class ModelIdentity:
    """What the ledger knows of a model: its name as configured, what it is, its width, its
    fingerprint (the vectors of PROBE_TEXTS, rounded; None when it cannot run here), whether its
    vectors are unit-length, and the prefix it puts before a question."""

    name: str
    dimensions: int
    fingerprint: tuple | None = None
    description: str = ""
    normalized: bool | None = True
    query_instruction: str | None = ""

    @property
    def short_fingerprint(self):
        return short_fingerprint(self.fingerprint)

    def __str__(self):
        return describe(self.name, self.description, self.dimensions, self.fingerprint)


def short_fingerprint(fingerprint):
    """A few hex digits naming a fingerprint, for people (two models differ in them, to rounding)."""
    if fingerprint is None:
        return None
    rounded = np.round(np.asarray(fingerprint, dtype=np.float64), 2) + 0.0  # +0.0: no "-0.0"
    return hashlib.sha256(json.dumps(rounded.tolist()).encode()).hexdigest()[:8]


def describe(name, description, dimensions, fingerprint):
    what = f"{description} ({name})" if description and description != name else name
    mark = f", fingerprint {short_fingerprint(fingerprint)}" if fingerprint is not None else ", not fingerprinted"
    return f"{what}, {dimensions} dims{mark}"


def identity_of(encoder):
    """The ModelIdentity of `encoder` (anything with `encode_documents`, or a `model_identity()`),
    computed once per encoder: its vectors of PROBE_TEXTS."""
    cached = getattr(encoder, "_ledger_identity", None)
    if cached is not None:
        return cached
    if callable(getattr(encoder, "model_identity", None)):
        identity = encoder.model_identity()
    else:
        vectors = np.asarray(encoder.encode_documents(list(PROBE_TEXTS)), dtype=np.float64)
        norms = np.linalg.norm(vectors, axis=1)
        identity = ModelIdentity(
            name=getattr(encoder, "model_name", type(encoder).__name__),
            dimensions=int(vectors.shape[1]),
            fingerprint=tuple(tuple(round(float(x), 5) for x in row) for row in vectors),
            description=getattr(encoder, "description", "") or "",
            normalized=bool(np.allclose(norms, 1.0, atol=1e-3)),
            query_instruction=getattr(encoder, "query_instruction", "") or "",
        )
    try:
        encoder._ledger_identity = identity
    except AttributeError:
        pass  # an encoder that takes no attributes computes it again next time
    return identity


@dataclass(frozen=True)
class Entry:
    """One active row of the ledger."""

    id: int
    column: str
    identity: ModelIdentity
    storage: str
    source: str
    recorded_at: object

    def __str__(self):
        return f"{self.identity} ({self.source} {self.recorded_at:%Y-%m-%d %H:%M})"


def _entry(row):
    (id_, column, name, description, fingerprint, dimensions, storage, normalized, instruction, source,
     recorded_at) = row
    if isinstance(fingerprint, str):
        fingerprint = json.loads(fingerprint)
    fingerprint = None if fingerprint is None else tuple(tuple(v) for v in fingerprint)
    identity = ModelIdentity(name, dimensions, fingerprint, description, normalized, instruction)
    return Entry(id_, column, identity, storage, source, recorded_at)


ACTIVE = (f"SELECT {FIELDS} FROM {LEDGER} WHERE retired_at IS NULL AND table_name = %(name)s "
          f"AND table_schema = {SCHEMA_OF} ORDER BY column_name")


def entries(cursor, table, before=""):
    """{column: Entry} of the active rows for `table` (as the search_path resolves it); LedgerMissing
    before the ledger's migration. `before`: statements sent ahead of the read in the same message (a
    writer's BEGIN and lock, a record), bound to their values already."""
    sql = f"{before.replace('%', '%%')}; {ACTIVE}" if before else ACTIVE
    return {row[1]: _entry(row) for row in _read(cursor, sql, {"table": table, "name": table.split(".")[-1]})}


def entries_from(rows):
    """{column: Entry} from the rows of ACTIVE (read by a caller with other reads: round_trips.reads)."""
    return {row[1]: _entry(row) for row in rows}


def entry(cursor, table, column):
    return entries(cursor, table).get(column)


def history(cursor, table):
    """Every row for `table`, retired ones included, oldest first: (Entry, retired_at)."""
    rows = _read(cursor, f"SELECT {FIELDS}, retired_at FROM {LEDGER} WHERE table_name = %(name)s "
                         f"AND table_schema = {SCHEMA_OF} ORDER BY recorded_at, id",
                 {"table": table, "name": table.split(".")[-1]})
    return [(_entry(row[:-1]), row[-1]) for row in rows]


def same_model(identity, recorded):
    """(True or False, the lowest cosine between their fingerprints, or None when one has none).

    Without a fingerprint (a declared model) only the names can be compared."""
    if identity.fingerprint is None or recorded.fingerprint is None:
        return identity.name == recorded.name, None
    if identity.dimensions != recorded.dimensions:
        return False, None
    a, b = np.asarray(identity.fingerprint), np.asarray(recorded.fingerprint)
    cosines = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    lowest = float(np.min(cosines))
    return lowest >= SAME_MODEL_COSINE, lowest


def record(cursor, table, column, identity, storage, source, unless_retired=False):
    """Record `identity` as the model of `table`.`column` unless a model is recorded already; the
    column's Entry either way (the caller compares; None when `unless_retired` and a retired entry names the
    column). One message."""
    insert = cursor.mogrify(
        f"""
        INSERT INTO {LEDGER} (table_schema, table_name, column_name, model_name, description, fingerprint,
                              dimensions, storage, normalized, query_instruction, source, recorded_at)
        SELECT {SCHEMA_OF}, %(name)s, %(column)s, %(model)s, %(description)s, %(fingerprint)s, %(dimensions)s,
               %(storage)s, %(normalized)s, %(instruction)s, %(source)s, now()
        WHERE NOT %(unless_retired)s OR NOT EXISTS (
            SELECT 1 FROM {LEDGER} WHERE retired_at IS NOT NULL AND table_name = %(name)s
              AND table_schema = {SCHEMA_OF} AND column_name = %(column)s)
        ON CONFLICT (table_schema, table_name, column_name) WHERE retired_at IS NULL DO NOTHING
        """,
        {"table": table, "name": table.split(".")[-1], "column": column, "model": identity.name,
         "description": identity.description, "dimensions": identity.dimensions, "storage": storage,
         "fingerprint": None if identity.fingerprint is None else json.dumps(identity.fingerprint),
         "normalized": identity.normalized, "instruction": identity.query_instruction, "source": source,
         "unless_retired": unless_retired},
    )
    return entries(cursor, table, before=insert.decode()).get(column)


def rename(cursor, table, renames):
    """Move the active entries along with their columns ({old name: new name}), in one statement."""
    if renames:
        cursor.execute(*rename_statement(table, renames))


def rename_statement(table, renames):
    """(sql, params) of rename(), for a caller that sends it within a message of its own."""
    olds, news = zip(*renames.items())
    return (
        f"UPDATE {LEDGER} l SET column_name = r.new FROM unnest(%(olds)s::text[], %(news)s::text[]) AS r(old, new) "
        f"WHERE l.retired_at IS NULL AND l.table_name = %(name)s AND l.table_schema = {SCHEMA_OF} "
        "AND l.column_name = r.old",
        {"olds": list(olds), "news": list(news), "table": table, "name": table.split(".")[-1]},
    )


def retire(cursor, table, column):
    """The column's vectors are going: no writer may write it any more (kept as history)."""
    cursor.execute(*retire_statement(table, column))


def retire_statement(table, column):
    """(sql, params) of retire(), for a caller that sends it within a message of its own."""
    return (
        f"UPDATE {LEDGER} SET retired_at = now() WHERE retired_at IS NULL AND table_name = %(name)s "
        f"AND table_schema = {SCHEMA_OF} AND column_name = %(column)s",
        {"table": table, "name": table.split(".")[-1], "column": column},
    )


def mismatch(table, column, recorded, identity, cosine, doing):
    """The ModelMismatch for `identity` meeting another model's column, naming both and the fix."""
    measured = f" (their vectors of the same texts agree only to cosine {cosine:.3f})" if cosine is not None else ""
    return ModelMismatch(
        f"{table}.{column} holds the vectors of {recorded.identity} ({recorded.source} "
        f"{recorded.recorded_at:%Y-%m-%d}); {doing} uses {identity}{measured}. Nothing was written. Set "
        f"EMBEDDING_MODEL back to {recorded.identity.name!r}, or change models with a new switch "
        "(`python manage.py makeswitch`, README \"Switching again\")."
    )


def entry_for_writer(cursor, table, column, identity, storage_of, retired_ok=False, recorded=None):
    """The Entry of the column this writer writes now: the one whose recorded model is `identity`
    (after a swap or an undo, `column` under its new name), else `column` itself, recorded as
    `identity`'s if no model is recorded for it yet (`storage_of()` gives its type then).
    ModelMismatch when `column` holds another model's vectors, or when its model was retired (the
    contract of its switch has begun) unless `retired_ok` (a loader that retired a declaration itself).

    Call it inside the writing transaction, after `LOCK TABLE ... IN ROW EXCLUSIVE MODE` (`recorded`: the
    entries(), read in that message already)."""
    if recorded is None:
        recorded = entries(cursor, table)
    for entry_ in recorded.values():
        if same_model(identity, entry_.identity)[0] and entry_.source != "simulated":
            return entry_
    found = recorded.get(column) or record(cursor, table, column, identity, storage_of(), "first write",
                                           unless_retired=not retired_ok)
    if found is None:
        _refuse_a_retired(cursor, table, column, identity)
    matched, cosine = same_model(identity, found.identity)
    if not matched or found.source == "simulated":
        raise mismatch(table, column, found, identity, cosine, "this writer")
    return found


def _refuse_a_retired(cursor, table, column, identity):
    """The ModelMismatch raised when `column` has no model recorded and none could be, because its model
    was retired (the contract of its switch has begun): its vectors are going, and no writer may fill it
    again."""
    retired = [entry_ for entry_, retired_at in history(cursor, table) if entry_.column == column and retired_at]
    if retired:
        raise ModelMismatch(
            f"{table}.{column} held the vectors of {retired[-1].identity}, retired: the contract of its switch has "
            f"begun and its vectors are going. Nothing was written; {identity} has no column to write any more.")
    raise ModelMismatch(f"{table}.{column}: no model is recorded for it and none could be. Nothing was written.")


def column_for_writer(cursor, table, column, identity, storage_of, retired_ok=False):
    """The column of entry_for_writer()."""
    return entry_for_writer(cursor, table, column, identity, storage_of, retired_ok).column


def check_reader(table, column, found, identity, doing="this search"):
    """`found` (the column's Entry, None when none is recorded); ModelMismatch when `identity` is not
    the model recorded for it, or puts another prefix before questions."""
    if found is None:
        return None
    matched, cosine = same_model(identity, found.identity)
    if not matched or found.source == "simulated":
        error = mismatch(table, column, found, identity, cosine, doing)
        raise ModelMismatch(str(error).replace("Nothing was written. ", "No question was embedded. "))
    recorded = found.identity.query_instruction
    if recorded is not None and identity.query_instruction is not None and recorded != identity.query_instruction:
        raise ModelMismatch(
            f"{table}.{column} was written by {found.identity.name!r}, whose questions were to be prefixed with "
            f"{recorded!r}; {doing} prefixes them with {identity.query_instruction!r}. Set "
            "EMBEDDING_QUERY_INSTRUCTION to the recorded prefix. No question was embedded."
        )
    return found


def evidence(encoder, samples):
    """(matched, lowest cosine) of the stored vectors `samples` [(text, vector)] against
    `encoder`'s vectors of the same texts."""
    texts = [text for text, _ in samples]
    stored = np.asarray([vector for _, vector in samples], dtype=np.float64)
    fresh = np.asarray(encoder.encode_documents(texts), dtype=np.float64)
    if fresh.shape != stored.shape:
        return False, None
    cosines = (fresh * stored).sum(axis=1) / (np.linalg.norm(fresh, axis=1) * np.linalg.norm(stored, axis=1))
    lowest = float(np.min(cosines))
    return lowest >= EVIDENCE_COSINE, lowest


def adopt(cursor, table, column, encoder, storage, samples, doing):
    """For a column with vectors and no recorded model: record `encoder`'s model when the stored
    `samples` [(text, vector)] are its vectors of their texts; ModelMismatch otherwise. The Entry."""
    matched, cosine = evidence(encoder, samples)
    identity = identity_of(encoder)
    if not matched:
        shown = "of another width" if cosine is None else f"cosine {cosine:.3f} at worst"
        raise ModelMismatch(
            f"{table}.{column} holds vectors no model is recorded for, and {len(samples)} of them are not "
            f"{identity}'s vectors of their texts ({shown}); {doing} would mix two models in one column. "
            "Nothing was written. Set EMBEDDING_MODEL to the model that wrote them (the ledger then records it), "
            "or change models with a new switch (`python manage.py makeswitch`)."
        )
    return record(cursor, table, column, identity, storage, f"adopted ({len(samples)} vectors matched)")
