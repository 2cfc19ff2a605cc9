"""Semantic search over `segments`, for the `search_segments` command, the admin and verification.

    results = search("benefits of fasting", k=10, speaker="Chaffee", rerank=True)
    for hit in results:
        hit.segment, hit.distance, hit.rerank_score

The query is embedded with the model whose vectors the column holds, as the model ledger records
it (embeddings/ledger.py): EMBEDDING_MODEL, or LEGACY_EMBEDDING_MODEL for the replaced model's
column; another model is refused before any question is embedded (`reader_for`). It is compared
by cosine distance, the operator of the HNSW index (`vector_cosine_ops`), so the index serves
the query. The search runs in its own transaction, where `SET LOCAL` (set_config(..., true), so
the values are parameters) gives:

- `hnsw.ef_search`: settings.HNSW_EF_SEARCH (or `ef_search=`), never lower than the number of
  rows asked for: an HNSW scan returns at most ef_search rows;
- `hnsw.iterative_scan = relaxed_order`, where the server's pgvector has it (0.8.0 and later):
  when the first ef_search candidates do not give k rows (a filter rejected some, or they
  are dead rows not yet vacuumed), the scan goes on instead of returning fewer. Relaxed order
  can return those extra rows slightly out of order; they are sorted again here.

The column searched is the one holding the new model's vectors at the table's current phase
(`embedding_384` before the swap, so the operator can try the new model before switching;
`embedding` after it), or `column=`. The query text never reaches SQL: only its vector does, as a
parameter. Vector columns are never loaded with the rows.
"""
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from urllib.parse import urlencode

import numpy as np
from django.conf import settings
from django.db import connections, transaction
from django.db.models.expressions import RawSQL
from pgvector.django import CosineDistance, VectorField

from askdrchaffee import postgres
from embeddings import ledger
from embeddings.encoder import DimensionMismatch, ModelUnavailable, get_service
from segments.models import Segment
from segments.schema import TABLE, require_vector_column, stored_samples, vector_columns
from segments.storage import COSINE_OPCLASSES

# hnsw.ef_search accepts 1..1000, and a plain HNSW scan returns at most ef_search rows.
MAX_K = 1000
ITERATIVE_SCAN_SINCE = (0, 8, 0)


class SearchError(ValueError):
    """A search that cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class SearchHit:
    segment: Segment
    distance: float  # cosine distance to the query: 0 is identical, 2 is opposite
    rerank_score: float | None = None  # the cross-encoder's score (higher is better) when reranked


@dataclass
class SearchResults:
    """The ranked hits of one search, with what the caller should be told about it."""

    query: str
    hits: list
    column: str
    phase: str
    ef_search: int
    reranker_model: str | None = None  # the model that reranked the hits; None when not reranked
    notes: list = field(default_factory=list)

    @property
    def reranked(self):
        return self.reranker_model is not None

    def __iter__(self):
        return iter(self.hits)

    def __getitem__(self, index):
        return self.hits[index]

    def __len__(self):
        return len(self.hits)


def format_timestamp(seconds):
    """`seconds` into a video as h:mm:ss."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


YOUTUBE_WATCH = "https://www.youtube.com/watch"


def youtube_url(video_id, start_sec):
    """The video on YouTube at a segment's start (`t` in whole seconds)."""
    return f"{YOUTUBE_WATCH}?{urlencode({'v': video_id, 't': f'{int(start_sec)}s'})}"


_versions = {}


def pgvector_version(using="default"):
    """The server's pgvector version as a tuple of ints, e.g. (0, 8, 1); None without the extension.

    Read once per database per process (an ALTER EXTENSION UPDATE shows after a restart).
    """
    params = connections[using].settings_dict
    key = (using, params.get("HOST"), params.get("PORT"), params.get("NAME"))
    if _versions.get(key) is None:
        _versions[key] = _read_pgvector_version(using)
    return _versions[key]


def _read_pgvector_version(using):
    with connections[using].cursor() as cursor:
        cursor.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        row = cursor.fetchone()
    if row is None:
        return None
    return tuple(int(part) for part in row[0].split(".") if part.isdigit())


def has_iterative_scan(using="default"):
    version = pgvector_version(using)
    return version is not None and version >= ITERATIVE_SCAN_SINCE


def cosine_index(column, using="default"):
    """(name, is_valid) of the HNSW cosine index (vector_cosine_ops or halfvec_cosine_ops, as the
    column's type) on segments.`column`, or None."""
    with connections[using].cursor() as cursor:
        cursor.execute(
            """
            SELECT c.relname, i.indisvalid FROM pg_index i
            JOIN pg_class c ON c.oid = i.indexrelid
            JOIN pg_am am ON am.oid = c.relam
            JOIN pg_opclass oc ON oc.oid = i.indclass[0]
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
            WHERE i.indrelid = to_regclass(%s) AND am.amname = 'hnsw'
              AND oc.opcname = ANY(%s) AND a.attname = %s
            ORDER BY i.indisvalid DESC LIMIT 1
            """,
            [TABLE, list(COSINE_OPCLASSES), column],
        )
        row = cursor.fetchone()
    return None if row is None else (row[0], row[1])


def vector_expression(column, using="default"):
    """segments.`column` as an ORM expression (the model knows only the final `embedding`)."""
    quote = connections[using].ops.quote_name
    return RawSQL(f"{quote(TABLE)}.{quote(column)}", [], output_field=VectorField())


def nearest_queryset(vector, column, filters=None, using="default"):
    """Segments ordered by cosine distance to `vector` (annotated as `distance`), vectors deferred."""
    queryset = Segment.objects.using(using).defer("embedding").filter(**(filters or {}))
    distance = CosineDistance(vector_expression(column, using), np.asarray(vector, dtype=np.float32))
    return queryset.annotate(distance=distance).order_by("distance")


@contextmanager
def _local_settings(values, using):
    """A transaction in which each setting of `values` is SET LOCAL; the values before are put back.

    Putting them back matters when the caller's transaction goes on after this block (a savepoint
    keeps SET LOCAL values when it is released). One round trip each way.
    """
    with transaction.atomic(using=using), connections[using].cursor() as cursor, \
            postgres.local_settings(cursor, **values):
        yield


def _search_settings(*, ef_search, k, iterative, exact=False, allow_seqscan=True):
    values = {"hnsw.ef_search": min(max(ef_search or settings.HNSW_EF_SEARCH, k), MAX_K)}
    if iterative:
        values["hnsw.iterative_scan"] = "relaxed_order"
    if exact:
        values["enable_indexscan"] = "off"
    if not allow_seqscan:
        values["enable_seqscan"] = "off"
    return values


def nearest(vector, *, k=10, column, filters=None, ef_search=None, exact=False, iterative=None, using="default"):
    """The `k` segments nearest to `vector` in segments.`column`, nearest first, with `.distance`.

    `exact=True` runs the same query with index scans disabled: the exact answer the HNSW
    search is measured against. `iterative=None` uses iterative index scans where pgvector has
    them; False turns them off. Rows without a vector never appear.
    """
    filters = filters or {}
    if iterative is None:
        iterative = has_iterative_scan(using)
    values = _search_settings(ef_search=ef_search, k=k, iterative=iterative, exact=exact)
    with _local_settings(values, using):
        rows = list(nearest_queryset(vector, column, filters, using)[:k])
    rows = [row for row in rows if row.distance is not None]
    rows.sort(key=lambda row: row.distance)  # relaxed_order iterative scans may be slightly out of order
    return rows


def explain_nearest(vector, *, k=10, column, filters=None, ef_search=None, allow_seqscan=True, using="default"):
    """EXPLAIN of the search query, planned under the settings the search runs with.

    `allow_seqscan=False` shows whether the index can serve the query at all, on a table too
    small for the planner to prefer it.
    """
    filters = filters or {}
    values = _search_settings(ef_search=ef_search, k=k, iterative=has_iterative_scan(using),
                              allow_seqscan=allow_seqscan)
    with _local_settings(values, using):
        return nearest_queryset(vector, column, filters, using)[:k].explain()


def _resolve_column(column, using):
    schema = require_vector_column(using)
    if column is None or column == schema.vector_column:
        return schema, schema.vector_column, schema.vector_dimensions
    columns = vector_columns(using)
    if column not in columns:
        raise SearchError(f"segments has no vector column {column!r}; its vector columns are: "
                          f"{', '.join(sorted(columns))}.")
    return schema, column, columns[column]


_adopted_by_evidence = {}  # (database, column, model fingerprint): True once checked against stored vectors


def reader_for(column, using="default", encoder=None, doing="this search"):
    """The encoder that embeds questions for segments.`column`: `encoder` when given, else the
    configured model the ledger records for the column (EMBEDDING_MODEL, or LEGACY_EMBEDDING_MODEL
    for the replaced model's column). ModelMismatch, before any question is embedded, when it is not
    the column's model; for a column no model is recorded for, a few stored vectors decide."""
    with connections[using].cursor() as cursor:
        recorded = ledger.entry(cursor, TABLE, column)
        encoder = encoder or configured_model(recorded)
        identity = ledger.identity_of(encoder)
        if ledger.check_reader(TABLE, column, recorded, identity, doing) is None:
            _check_evidence(cursor, using, column, encoder, identity, doing)
    return encoder


def configured_model(recorded):
    """The service of the configured model that wrote `recorded` (a ledger Entry, or None)."""
    if recorded is not None and recorded.identity.name == settings.LEGACY_EMBEDDING_MODEL \
            and recorded.identity.name != settings.EMBEDDING_MODEL:
        return get_service(model_name=settings.LEGACY_EMBEDDING_MODEL, dimensions=recorded.identity.dimensions)
    return get_service()


def _check_evidence(cursor, using, column, encoder, identity, doing):
    key = (connections[using].settings_dict.get("NAME"), column, identity.short_fingerprint)
    if key in _adopted_by_evidence:
        return
    samples = stored_samples(cursor, column)
    if samples:
        matched, cosine = ledger.evidence(encoder, samples)
        if not matched:
            shown = "of another width" if cosine is None else f"cosine {cosine:.3f} at worst"
            raise ledger.ModelMismatch(
                f"segments.{column} holds vectors no model is recorded for, and they are not {identity}'s vectors of "
                f"their texts ({shown}); {doing} would rank by meaningless distances. No question was embedded. "
                "Set EMBEDDING_MODEL to the model that wrote them.")
    _adopted_by_evidence[key] = True


def _query_vector(query, encoder, column, dimensions):
    vector = np.asarray(encoder.encode_query(query), dtype=np.float32)
    if vector.ndim != 1 or (dimensions is not None and vector.shape[0] != dimensions):
        raise DimensionMismatch(
            f"The query vector has {vector.shape[-1]} dimensions but segments.{column} holds "
            f"{dimensions}: set EMBEDDING_MODEL to the model that wrote the column."
        )
    if not np.all(np.isfinite(vector)) or not np.any(vector):
        raise SearchError("The model produced an empty or non-finite vector for this query; rephrase it.")
    return vector


def _filters(video_id, speaker, video_type):
    given = {"video_id": video_id, "speaker_label": speaker, "video_type": video_type}
    return {name: value for name, value in given.items() if value is not None}


def _validate(query, k, ef_search):
    if not query or not query.strip():
        raise SearchError("The query is empty: give the words to search for.")
    if not 1 <= k <= MAX_K:
        raise SearchError(f"k={k}: ask for between 1 and {MAX_K} results.")
    if ef_search is not None and not 1 <= ef_search <= MAX_K:
        raise SearchError(f"ef_search={ef_search}: choose a value between 1 and {MAX_K} (pgvector's range).")


def _notes(schema, column, filtered, iterative, using):
    notes = []
    if not schema.is_live and column == schema.vector_column:
        notes.append(f"Searching segments.{column}, the new model's vectors, before the swap "
                     f"(phase {schema.phase}): the application still serves the legacy column.")
    index = cosine_index(column, using)
    if index is None and column != schema.vector_column:  # the replaced model's: no step builds its index
        notes.append(f"segments.{column} has no HNSW index: this search scanned the whole table (exact, and "
                     "slower on a large table).")
    elif index is None:
        fix = ("Build it with `manage.py embedding_switch index`." if schema.phase == "expanded" else
               "`manage.py verify_embeddings` says how to create it.")
        notes.append(f"segments.{column} has no HNSW index: this search scanned the whole table. {fix}")
    elif not index[1]:
        notes.append(f"The HNSW index {index[0]} is INVALID (an interrupted build): this search scanned the "
                     f"whole table. Rebuild it with `REINDEX INDEX CONCURRENTLY {index[0]};`.")
    if filtered and not iterative:
        notes.append("This pgvector has no iterative index scans (0.8.0+): a filtered search may "
                     "return fewer rows than asked for. Upgrade the extension to fix it.")
    return notes


def _rerank(query, hits, k, reranker, notes):
    """(the best `k` hits by the reranker's score, the model that scored them or None)."""
    from embeddings.reranker import get_reranker, is_out_of_memory

    try:
        reranker = reranker or get_reranker()
        ranked = reranker.rerank(query, [hit.segment.text for hit in hits], top_k=k)
    except ModelUnavailable as exc:
        notes.append(f"Reranking disabled: {exc}")
        return hits[:k], None
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        notes.append(f"Reranking disabled: the reranker ran out of memory ({exc}). "
                     "Lower RERANK_BATCH_SIZE or RERANK_TOP_K.")
        return hits[:k], None
    notes.extend(reranker.notes)
    return [replace(hits[item.index], rerank_score=item.score) for item in ranked], reranker.loaded_model_name


def search(query, *, k=10, video_id=None, speaker=None, video_type=None, rerank=False, ef_search=None,
           encoder=None, reranker=None, column=None, using="default"):
    """The `k` segments nearest in meaning to `query`, as SearchResults.

    With `rerank`, the nearest max(k, RERANK_TOP_K) candidates are re-scored by the reranker and
    the best `k` by its score returned; when it cannot run, the results say why in `notes`.
    Raises SearchError for a request that cannot run, SchemaNotReady before phase 1, and
    ModelUnavailable/DimensionMismatch when the embedding model does not fit.
    """
    _validate(query, k, ef_search)
    schema, column, dimensions = _resolve_column(column, using)
    filters = _filters(video_id, speaker, video_type)
    vector = _query_vector(query, reader_for(column, using, encoder), column, dimensions)
    candidates = min(max(k, settings.RERANK_TOP_K), MAX_K) if rerank else k
    effective_ef = min(max(ef_search or settings.HNSW_EF_SEARCH, candidates), MAX_K)
    iterative = has_iterative_scan(using)
    rows = nearest(vector, k=candidates, column=column, filters=filters, ef_search=effective_ef,
                   iterative=iterative, using=using)
    hits = [SearchHit(row, float(row.distance)) for row in rows]
    results = SearchResults(query, hits, column, schema.phase, effective_ef,
                            notes=_notes(schema, column, bool(filters), iterative, using))
    if rerank and hits:
        results.hits, results.reranker_model = _rerank(query, hits, k, reranker, results.notes)
    return results
