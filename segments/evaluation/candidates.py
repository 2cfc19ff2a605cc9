"""Choosing the next model before switching: candidate models judged on a sample of this table's own
segments, so that the operator picks on their own data before `makeswitch`.

A sample of whole videos (about `sample` segments with text, at any phase) is embedded by each
candidate into memory (scratch space: nothing is written to the table), and judged as the evaluation
judges a new column: known-item queries (a sentence of a sampled segment, answered by the same
moment) searched exactly among the sample (recall@1, recall@10, MRR@10), each segment's neighbours
from the same moment, and vectors that cannot serve a search (health.py). With them, what each costs
here: texts embedded per second on this machine (after the model is loaded), bytes a row in the
column's storage, and the memory of its HNSW graph for every segment with text
(segments.index_build, m = 16). Candidates are ranked by recall@10, then MRR@10; one whose vectors
cannot serve a search ranks last.
"""
import time

import numpy as np

from segments import index_build
from segments.evaluation import health, metrics, neighbours, queries, table
from segments.evaluation.sides import EvaluationError
from segments.schema import HNSW_M, TABLE, blank_sql
from segments.storage import configured


def _sample(using, size, seed):
    """{id: SegmentRow} of whole videos' segments with text, about `size` of them."""
    with table.reading(using, 60.0) as cursor:
        cursor.execute(f"""
            SELECT s.id FROM {TABLE} s JOIN (
                SELECT video_id, count(*) AS n, sum(count(*)) OVER (ORDER BY md5(video_id || %s), video_id) AS running
                FROM {TABLE} s WHERE NOT ({blank_sql()}) GROUP BY video_id) v ON v.video_id = s.video_id
            WHERE NOT ({blank_sql()}) AND v.running - v.n < %s""", [str(seed), size])
        rows = table.segments(cursor, [row[0] for row in cursor.fetchall()])
        with_text = table.rows_with_text(cursor)
    return rows, with_text


def _ranks(matrix, query_vectors, asked, ids, rows, window):
    vectors = neighbours.unit(np.asarray(matrix, dtype=np.float32))
    scores = neighbours.unit(np.asarray(query_vectors, dtype=np.float32)) @ vectors.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, : metrics.K]
    hits = [[(rows[ids[i]].id, rows[ids[i]].video_id, rows[ids[i]].start_sec, rows[ids[i]].end_sec) for i in line]
            for line in top]
    return [metrics.rank_of(found, query.answers, window) for found, query in zip(hits, asked)]


def judge(name, rows, ids, asked, with_text, window, seed, using):
    """One candidate's figures (module docstring); {"model", "problem"} when it cannot be loaded."""
    from embeddings.encoder import get_service

    encoder = get_service(model_name=name)
    texts = [rows[pk].text for pk in ids]
    try:
        encoder.encode_documents(texts[:16])  # loads and warms it
    except Exception as exc:  # any model that fails to load: said for this candidate, the others go on
        return {"model": name, "problem": f"{type(exc).__name__}: {exc}"}
    started = time.perf_counter()
    documents = encoder.encode_documents(texts)
    seconds = time.perf_counter() - started
    ranks = _ranks(documents, encoder.encode_queries([query.text for query in asked]), asked, ids, rows, window)
    chosen = neighbours.choose(neighbours.eligible(rows, ids, window), len(asked), seed)
    near, _, _ = neighbours.ranks(rows, ids, documents, chosen, window)
    return {"model": name, "description": encoder.description, "dimensions": int(documents.shape[1]),
            "known_item": metrics.side(ranks), "neighbours": metrics.side(near),
            "health": health.check(documents[:1000], texts[:1000], f"{name}'s sample"),
            "texts_per_second": len(texts) / seconds if seconds else None,
            **_costs(documents.shape[1], with_text, using)}


def _costs(dimensions, with_text, using):
    from django.db import connections

    storage = configured(connections[using])
    value = storage.value_bytes(dimensions)
    return {"storage": storage.type_name, "bytes_per_row": value,
            "index_bytes": round(index_build.element_bytes(value, HNSW_M) * with_text)}


def _order(entry):
    if entry.get("problem"):
        return (2, 0, 0)
    known = entry["known_item"]
    broken = 1 if entry["health"]["problems"] else 0
    return broken, -(known["recall_at_10"]["value"] or 0), -(known["mrr_at_10"]["value"] or 0)


def compare_candidates(names, using="default", sample=2000, queries_asked=300, seed=0, window=10.0, progress=None):
    """The candidates ranked, best first, with the sample they were judged on."""
    from django.db import connections

    say = progress or (lambda line: None)
    rows, with_text = _sample(using, sample, seed)
    if not rows:
        raise EvaluationError("segments has no segment with text to judge candidates on: load segments first.")
    ids = sorted(rows)
    chosen = neighbours.choose(ids, queries_asked, seed)
    asked = queries.known_items([rows[pk] for pk in chosen], seed)
    found = []
    for name in dict.fromkeys(names):
        say(f"candidate {name}: embedding {len(ids):,} segments and {len(asked)} queries")
        found.append(judge(name, rows, ids, asked, with_text, window, seed, using))
    return {"sample": len(ids), "videos": len({row.video_id for row in rows.values()}), "queries": len(asked),
            "rows_with_text": with_text, "storage": configured(connections[using]).type_name,
            "candidates": sorted(found, key=_order)}
