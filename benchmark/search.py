"""The search suite: `vector` and `halfvec` side by side: load, HNSW build, size, latency and recall@10.

For each type of `--search-types` (vector(d) and halfvec(d) by default) a scratch table of
`--rows` rows (search_sets.py says where they come from) is loaded by binary COPY and given an
HNSW index with the live index's parameters (segments.schema.HNSW_M, HNSW_EF_CONSTRUCTION, the
type's cosine operator class), built with the memory and parallel workers reported
(search_tables.py). Then, on the same queries (search_queries.py times and scores them):

- the sweep of `--ef-search`: p50/p95 latency and recall@10 against the exact answer, computed in
  numpy (truth.py) from the very values the column holds (float16-rounded for halfvec; for it,
  the recall against the float32 answer too, each row it returned scored in float32);
- filtered searches (filtered.py): a video holding 10% and one holding 1% of the rows, with
  pgvector 0.8's iterative index scans off, relaxed_order and strict_order, at the ef_search
  that reached recall FULL_RECALL_TARGET: latency, recall against the exact filtered answer,
  rows returned;
- the bytes a vector takes in the table (mean pg_column_size), against a legacy 1536-dim vector.

With `--check-derived`, derived vectors are checked against real ones (derived_check.py).
The top-level figures (`p50_ms`, `recall_at_10`, `sweep`, ...) are the `vector` table's, as
before; `types` holds every type's.
"""
import numpy as np
from django.db import connections

from benchmark import derived_check, filtered, search_tables, truth
from benchmark.measure import percentile_ms
from benchmark.search_queries import (
    K, RECALL_TARGET, TRUTH_SLACK, chosen, index_used, literal, recall, rescored, run_queries, sweep,
    torch_thread_count, with_encoding,
)
from benchmark.search_sets import search_set
from segments.schema import HNSW_EF_CONSTRUCTION, HNSW_M, LEGACY_DIMENSIONS
from segments.search import has_iterative_scan
from segments.storage import STORAGES

DEFAULT_EF_SEARCH = (10, 20, 40, 80, 100, 200, 400, 800)
SEARCH_TYPES = ("vector", "halfvec")
LATENCY_TARGET_MS = 10
TARGET_ROWS = 100_000
# At a million rows: p50 under 5 ms at recall@10 >= 0.98; a halfvec at most 13% of a legacy vector.
FULL_RECALL_TARGET = 0.98
FULL_LATENCY_TARGET_MS = 5
FULL_TARGET_ROWS = 1_000_000
LEGACY_SHARE_TARGET = 0.13
LEGACY_COLUMN_BYTES = STORAGES["vector"].value_bytes(LEGACY_DIMENSIONS)  # 6,152
ENCODED_QUERIES = 50
EXACT_TIMED_QUERIES = 10  # exact searches timed in SQL (the recall's exact answers come from numpy)


def _operating_point(entries, target):
    best, reached = chosen(entries, target)
    return {"ef_search": best["ef_search"], "p50_ms": best["p50_ms"], "p95_ms": best["p95_ms"],
            "recall_at_10": best["recall_at_10"], "reached": reached}


def filtered_figures(ctx, cursor, table, type_name, data, videos, rows_stored, queries_stored, ef):
    """Each filter of filtered.FILTERS under each iterative-scan mode, at `ef`."""
    modes = filtered.MODES if has_iterative_scan(ctx.options.using) else ("off",)
    literals = [literal(query) for query in queries_stored]
    figures = []
    for name, video, share in filtered.FILTERS:
        matching = int(np.sum(videos == video))
        entry = {"filter": name, "video_id": video, "share": share, "rows_matching": matching,
                 "rows_expected": min(K, matching), "modes": {}}
        figures.append(entry)
        if not matching:
            continue
        exact = truth.filtered_top_k(rows_stored, data.ids, videos, video, queries_stored, K)
        for mode in modes:
            ctx.progress(f"search: {type_name}, filter on a {share:.0%} video, iterative scan {mode}")
            statements = filtered.settings_sql(ef, mode, ctx.options.max_scan_tuples)
            durations, found = filtered.run(cursor, table, type_name, literals, video, statements, K)
            counts = [len(rows) for rows in found]
            entry["modes"][mode] = {
                "p50_ms": percentile_ms(durations, 50), "p95_ms": percentile_ms(durations, 95),
                "recall_at_10": recall(found, exact, TRUTH_SLACK), "rows_min": min(counts),
                "rows_mean": float(np.mean(counts)),
                "share_with_all_rows": float(np.mean([count >= entry["rows_expected"] for count in counts]))}
    return {"k": K, "ef_search": ef, "max_scan_tuples": ctx.options.max_scan_tuples, "modes": list(modes),
            "index_used": filtered.index_used(cursor, table, type_name, literals[0], filtered.FILTERS[0][1], K),
            "filters": figures}


def _against_float32(data, float32_exact):
    """extra figures of a sweep: recall against the float32 answer, each row scored in float32."""
    def figures(found):
        scored = rescored(found, data.ids, data.vectors, data.queries)
        return {"recall_at_10_vs_float32": recall(scored, float32_exact, TRUTH_SLACK)}
    return figures


def measure_type(ctx, cursor, type_name, data, videos, float32_exact):
    """Every figure of one type's table: load, build, sizes, the sweep, filtered searches, encoding."""
    table, rows = ctx.scratch.table(f"search_{type_name}"), len(data.ids)
    storage = STORAGES[type_name]
    search_tables.create(cursor, table, type_name, data.vectors.shape[1])
    ctx.progress(f"search: loading {rows:,} rows into {storage.sql_type(data.vectors.shape[1])} (binary COPY)")
    load_s = search_tables.load(cursor, table, type_name, data.ids, videos, data.vectors)
    build = search_tables.build_settings(cursor, table, rows, type_name, ctx.options.index_memory,
                                         ctx.options.index_workers)
    ctx.progress(f"search: building the {type_name} HNSW index (maintenance_work_mem "
                 f"{build.as_dict()['maintenance_work_mem_human']}, {build.parallel_workers} parallel workers)")
    build_s, fitted = search_tables.build_index(cursor, table, type_name, build)
    sizes = search_tables.sizes(cursor, table)
    rows_stored = search_tables.stored(data.vectors, type_name)
    queries_stored = search_tables.stored(data.queries, type_name)
    exact = float32_exact if type_name == "vector" else truth.top_k(rows_stored, data.ids, queries_stored, K)
    literals = [literal(query) for query in queries_stored]
    entries = sweep(ctx, cursor, table, type_name, literals, exact,
                    None if type_name == "vector" else _against_float32(data, float32_exact))
    exact_durations, _ = run_queries(cursor, table, literals[:EXACT_TIMED_QUERIES],
                                     ["SET LOCAL enable_indexscan = off"], type_name)
    at_target, at_full_target = _operating_point(entries, RECALL_TARGET), _operating_point(entries, FULL_RECALL_TARGET)
    filters = filtered_figures(ctx, cursor, table, type_name, data, videos, rows_stored, queries_stored,
                               at_full_target["ef_search"])
    ctx.progress(f"search: {type_name}, with query encoding")
    texts = data.query_texts[:ENCODED_QUERIES]
    encoded = with_encoding(ctx, cursor, table, texts, at_target["ef_search"], type_name=type_name)
    encoded_one = with_encoding(ctx, cursor, table, texts, at_target["ef_search"], threads=1, type_name=type_name)
    uses_index = index_used(cursor, table, literals[0], type_name)
    cursor.execute(f"DROP TABLE {table}")
    return {
        "type": storage.sql_type(data.vectors.shape[1]),
        "index": f"hnsw (m={HNSW_M}, ef_construction={HNSW_EF_CONSTRUCTION}, {storage.cosine_opclass})",
        "rows": sizes["rows"],
        "load_s": load_s,
        "load_rows_per_s": rows / load_s if load_s > 0 else None,
        "index_build_s": build_s,
        "index_build": {**build.as_dict(), "graph_fitted_in_memory": fitted},
        "index_mb": sizes["index_bytes"] / 2**20,
        "index_used": uses_index,
        "column_bytes_per_row": sizes["column_bytes_per_row"],
        "share_of_legacy_column": sizes["column_bytes_per_row"] / LEGACY_COLUMN_BYTES,
        "table_bytes_per_row": sizes["table_bytes"] / max(1, sizes["rows"]),
        "exact_p50_ms": percentile_ms(exact_durations, 50),
        "exact_queries_timed": len(exact_durations),
        "sweep": entries,
        f"at_recall_{RECALL_TARGET}": at_target,
        f"at_recall_{FULL_RECALL_TARGET}": at_full_target,
        "filtered": filters,
        "with_encoding_p50_ms": percentile_ms(encoded, 50),
        "with_encoding_p95_ms": percentile_ms(encoded, 95),
        "with_encoding_queries": len(encoded),
        "with_encoding_torch_threads": torch_thread_count(),
        "with_encoding_one_thread_p50_ms": percentile_ms(encoded_one, 50),
        "with_encoding_one_thread_p95_ms": percentile_ms(encoded_one, 95),
    }


def _returns_k_rows(figures):
    """Whether the iterative relaxed_order scan returned every row expected, for every filter."""
    filters = [entry for entry in figures["filtered"]["filters"] if entry["rows_matching"]]
    return bool(filters) and all("relaxed_order" in entry["modes"] and
                                 entry["modes"]["relaxed_order"]["rows_min"] == entry["rows_expected"]
                                 for entry in filters)


def targets(types, rows):
    """Each target: the former one (vector, 100k rows) and those at a million rows, per type."""
    main = types.get("vector") or next(iter(types.values()))
    at_target = main[f"at_recall_{RECALL_TARGET}"]
    met = {
        f"p50_under_{LATENCY_TARGET_MS}_ms_at_recall_{RECALL_TARGET}":
            at_target["reached"] and at_target["p50_ms"] < LATENCY_TARGET_MS,
        f"measured_on_at_least_{TARGET_ROWS}_rows": rows >= TARGET_ROWS,
        f"measured_on_at_least_{FULL_TARGET_ROWS}_rows": rows >= FULL_TARGET_ROWS,
    }
    for name, figures in types.items():
        point = figures[f"at_recall_{FULL_RECALL_TARGET}"]
        met[f"{name}_p50_under_{FULL_LATENCY_TARGET_MS}_ms_at_recall_{FULL_RECALL_TARGET}"] = (
            point["reached"] and point["p50_ms"] < FULL_LATENCY_TARGET_MS)
        met[f"{name}_filtered_searches_return_{K}_rows"] = _returns_k_rows(figures)
    if "halfvec" in types:
        met[f"halfvec_column_at_most_{LEGACY_SHARE_TARGET:.0%}_of_legacy"] = (
            types["halfvec"]["share_of_legacy_column"] <= LEGACY_SHARE_TARGET)
    return met


def run(ctx):
    """Measure each type of --search-types on the same rows and queries; returns the suite's figures."""
    with connections[ctx.options.using].cursor() as cursor:
        data = search_set(ctx, cursor)
        videos = filtered.assign_videos(len(data.ids), ctx.options.seed)
        ctx.progress(f"search: exact top {K} of {len(data.queries)} queries (numpy)")
        float32_exact = truth.top_k(data.vectors, data.ids, data.queries, K)
        types = {name: measure_type(ctx, cursor, name, data, videos, float32_exact) for name in ctx.options.search_types}
        check = None
        if ctx.options.check_derived:
            check = derived_check.run(ctx, cursor, data.real, data.queries)
        buffers = search_tables.shared_buffers(cursor)
    main = types.get("vector") or next(iter(types.values()))
    at_target = main[f"at_recall_{RECALL_TARGET}"]
    results = {
        "rows": main["rows"],
        "vectors": data.kind,
        "vectors_source": data.description,
        "vectors_details": data.details,
        "queries": len(data.queries),
        "query_vectors": data.query_description,
        **{key: main[key] for key in ("index", "index_build_s", "index_mb", "index_used", "exact_p50_ms")},
        "ef_search": at_target["ef_search"],
        "p50_ms": at_target["p50_ms"],
        "p95_ms": at_target["p95_ms"],
        "recall_at_10": at_target["recall_at_10"],
        "recall_target_reached": at_target["reached"],
        **{key: value for key, value in main.items() if key.startswith("with_encoding")},
        "sweep": main["sweep"],
        "types": types,
        "legacy_column_bytes": LEGACY_COLUMN_BYTES,
        "filter_assignment": filtered.ASSIGNMENT,
        "shared_buffers_mb": buffers / 2**20,
        "targets": targets(types, main["rows"]),
    }
    if check is not None:
        results["derived_check"] = check
    return results
