"""Filtered searches: `WHERE video_id = X ORDER BY embedding <=> q LIMIT 10` through the HNSW index.

A plain HNSW scan hands over the ef_search nearest candidates it found and only then is the
filter applied: with a filter matching 1% of the rows and ef_search 40, about 0.4 of the 10 rows
asked for come back. pgvector 0.8's iterative index scans go on searching the graph until
enough rows pass the filter (or hnsw.max_scan_tuples have been visited): `strict_order` returns
them in exact distance order, `relaxed_order` may return them slightly out of order (a caller
sorts them again) and costs less. Each mode is measured on the same queries: latency, recall@10
against the exact filtered answer (truth.filtered_top_k), and how many rows each query got.

Every row gets a video_id drawn at random: video 1 holds ~10% of the rows, video 2 ~1%, the rest
are spread over many other videos. The draw ignores the vectors, so the rows a filter keeps are
scattered over the whole graph (the common case for a speaker or video filter over many topics).
"""
import time

import numpy as np
from django.db import transaction

FILTERS = (("video holding 10% of the rows", 1, 0.10), ("video holding 1% of the rows", 2, 0.01))
MODES = ("off", "relaxed_order", "strict_order")
OTHER_VIDEOS = 1000
DEFAULT_MAX_SCAN_TUPLES = 20_000  # pgvector's default for hnsw.max_scan_tuples
ASSIGNMENT = ("video_id drawn at random per row, whatever its vector: video 1 ~10% of the rows, video 2 ~1%, "
              f"the rest over {OTHER_VIDEOS} other videos")


def assign_videos(count, seed=0):
    """A video_id per row: FILTERS' videos with their shares, the rest over OTHER_VIDEOS others."""
    rng = np.random.default_rng(seed + 2)
    draw = rng.random(count)
    videos = rng.integers(len(FILTERS) + 1, len(FILTERS) + 1 + OTHER_VIDEOS, count, dtype=np.int32)
    floor = 0.0
    for _, video, share in FILTERS:
        videos[(draw >= floor) & (draw < floor + share)] = video
        floor += share
    return videos


def settings_sql(ef_search, mode, max_scan_tuples):
    """SET LOCAL statements of one filtered search (the index forced: no btree on video_id here)."""
    statements = ["SET LOCAL enable_seqscan = off", f"SET LOCAL hnsw.ef_search = {int(ef_search)}"]
    if mode != "off":
        statements += [f"SET LOCAL hnsw.iterative_scan = {mode}",
                       f"SET LOCAL hnsw.max_scan_tuples = {int(max_scan_tuples)}"]
    return statements


def top_k_sql(table, type_name, k):
    return (f"SELECT id, embedding <=> %s::{type_name} FROM {table} WHERE video_id = %s "
            f"ORDER BY embedding <=> %s::{type_name} LIMIT {int(k)}")


def run(cursor, table, type_name, literals, video, statements, k):
    """(per-query seconds, per-query [(id, distance)]) of the filtered search for `video`."""
    sql, durations, results = top_k_sql(table, type_name, k), [], []
    with transaction.atomic(using=cursor.db.alias):
        for statement in statements:
            cursor.execute(statement)
        for query in literals:
            started = time.perf_counter()
            cursor.execute(sql, [query, video, query])
            rows = cursor.fetchall()
            durations.append(time.perf_counter() - started)
            results.append(rows)
    return durations, results


def index_used(cursor, table, type_name, literal, video, k):
    """True when the filtered search's plan is an HNSW index scan."""
    with transaction.atomic(using=cursor.db.alias):
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute(f"EXPLAIN {top_k_sql(table, type_name, k)}", [literal, video, literal])
        return any("Index Scan" in line for (line,) in cursor.fetchall())
