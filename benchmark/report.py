"""The benchmark's results as a readable table, and the change against an earlier run.

`render(results)` and `render_comparison(old, new)` return lists of lines; the command writes
them. `compare(old, new)` returns the changes as data, for `--json`.
"""


def _n(value, digits=0):
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _table(header, rows, indent="  ", left=(0,)):
    """Aligned lines: columns numbered in `left` left-aligned, the others right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells):
        return indent + "  ".join(str(cell).ljust(width) if i in left else str(cell).rjust(width)
                                  for i, (cell, width) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), *(line(row) for row in rows)]


def _targets(figures):
    targets = figures.get("targets") or {}
    return [f"  target {name.replace('_', ' ')}: {'met' if met else 'NOT met'}" for name, met in targets.items()]


def render_machine(machine):
    gpu = machine["gpu"] or "none"
    return [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB; GPU: {gpu}",
        f"  torch {machine['torch']} ({machine['torch_threads']} threads), sentence-transformers "
        f"{machine['sentence_transformers']}, PostgreSQL {machine['postgresql']}, pgvector {machine['pgvector']}",
    ]


def render_encode(figures):
    rows = [[run["dtype"], run["texts_per_call"], _n(run["texts_per_s"], 1), _n(run["st_encode_texts_per_s"], 1),
             f"{run['ratio_to_st_encode']:.2f}x", _n(run["tokens_per_s"]), _n(run["peak_memory_mb"]),
             f"{run['ratio_to_baseline']:.2f}x", f"{run['min_cosine_to_plain']:.5f}"] for run in figures["runs"]]
    chosen = figures.get("chosen_texts_per_call")
    lines = [
        f"encode: {figures['model']} on {figures['device']}",
        f"  {figures['texts']:,} texts from {figures['texts_source']}, "
        f"{figures['mean_tokens_per_text']:.0f} tokens each on average",
        *_table(["dtype", "texts/call", "pipeline/s", "ST encode/s", "ratio", "tokens/s", "peak MB", "vs plain",
                 "min cosine"], rows),
        "  pipeline: EmbeddingsService.encode_documents (embeddings/pipeline.py); ST encode: the former path, "
        "one SentenceTransformer.encode(batch_size=N) call; min cosine: the pipeline's vectors against plain "
        "encode()'s",
        f"  plain encode() baseline: {_n(figures['baseline_texts_per_s'], 1)} texts/s ({figures['baseline']})",
        f"  best: {_n(figures['best_texts_per_s'], 1)} texts/s at {figures['best_texts_per_call']} texts per call "
        f"({figures['best_dtype']}), {figures['ratio_to_baseline']:.2f}x plain encode(), "
        f"{figures['ratio_to_st_encode']:.2f}x the best ST encode; "
        f"each figure the best of {figures['repeats']} runs; memory is {figures['peak_memory_kind']}",
    ]
    if chosen:
        measured = ", ".join(f"{size}: {rate:,.0f}" for size, rate in chosen["texts_per_s"].items())
        lines.append(f"  texts per call the service chose on this device: {chosen['texts_per_call']} ({measured} texts/s)")
    return lines + _targets(figures)


DB_WRITE_ROWS = [  # production-shaped first
    ("live_backfill_path", "backfill path", "live-shaped, legacy IVFFlat index"),
    ("live_without_legacy_index_backfill_path", "backfill path", "live-shaped, legacy index dropped"),
    ("backfill_path", "backfill path", "scratch copy (no vector index)"),
    ("per_row_update", "one UPDATE per row", "scratch copy"),
    ("bulk_update", "ORM bulk_update", "scratch copy"),
    ("raw_copy", "raw binary COPY", "empty table, no index"),
]


def render_db_write(figures):
    share = {**figures["share_of_raw_copy"], "raw_copy": 1.0}
    rows = [[label, table, _n(figures[name]["rows_written"]), _n(figures[name]["rows_per_s"]), f"{share[name]:.2f}"]
            for name, label, table in DB_WRITE_ROWS]
    return [
        f"db-write: {figures['dimensions']}-dim vectors into {figures['table_rows']:,}-row tables "
        f"({figures['rows_source']})",
        *_table(["method", "table", "rows", "rows/s", "of raw COPY"], rows, left=(0, 1)),
        f"  backfill path: {figures['backfill_path']['method']}, one session",
        f"  on the live-shaped table the legacy IVFFlat index costs {figures['live_legacy_index_cost']:.2f}x "
        "(rate without it / with it)",
        f"  backfill path on the scratch copy: {figures['backfill_path_vs_per_row_update']:.1f}x per-row UPDATE, "
        f"{figures['backfill_path_vs_bulk_update']:.1f}x bulk_update",
        *_targets(figures),
    ]


PRODUCTION_ROWS = [  # production-shaped first
    ("today_live", "live-shaped, legacy IVFFlat index", "former settings"),
    ("live", "live-shaped, legacy IVFFlat index", "engine"),
    ("live_without_legacy_index", "live-shaped, legacy index dropped", "engine"),
    ("simulated_gpu", "live-shaped, legacy index dropped", "engine"),
    ("today_scratch", "scratch copy (no vector index)", "former settings"),
    ("scratch", "scratch copy (no vector index)", "engine"),
]


def _stage_cell(stages, name):
    return f"{stages[name]['busy_share'] * 100:.0f}%" if name in stages else "-"


def render_production(figures):
    runs, share = figures["production"], figures.get("share_of_raw_copy", {})
    rows = [[key, table, settings, "simulated GPU" if key == "simulated_gpu" else "zero-cost",
             _n(runs[key]["rows_per_s"]), f"{share[key]:.2f}" if key in share else "-",
             _stage_cell(runs[key]["stages"], "claim"), _stage_cell(runs[key]["stages"], "encode"),
             _stage_cell(runs[key]["stages"], "write"), runs[key]["limited_by"] or "-"]
            for key, table, settings in PRODUCTION_ROWS]
    return [
        f"  the production case: {figures['production_rows']:,} segments per run, each on a fresh table "
        f"(best of {figures['production_rounds']} alternating rounds)",
        *_table(["run", "table", "engine", "encoder", "rows/s", "of raw COPY", "claim", "encode", "write",
                 "limited by"], rows, left=(0, 1, 2, 3, 9), indent="    "),
        "    former settings: 1 write session, synchronous commit, 1 claim per encode call; engine: "
        f"{runs['live']['tuning']['writers']} write sessions, asynchronous commit, up to "
        f"{runs['live']['tuning']['encode_window']} claims per encode call; claim/encode/write: each stage's "
        "busy share",
        f"    after the operator drops the legacy index: {figures['live_without_legacy_index_vs_today_live']:.2f}x "
        f"today's engine on the live-shaped table with it, {figures['live_without_legacy_index_vs_scratch']:.2f}x "
        "the same engine on the scratch copy",
        f"    simulated GPU at {figures['simulated_gpu_texts_per_s']:,.0f} texts/s: "
        f"{figures['simulated_gpu_vs_zero_cost']:.2f}x the zero-cost encoder and "
        f"{figures['simulated_gpu_share_of_its_rate']:.2f} of the GPU's own rate; limited by the "
        f"{figures['simulated_gpu_limited_by']} stage"
        + (" (the GPU itself)" if figures["simulated_gpu_limited_by"] == "encode" else ""),
    ]


def render_backfill(figures):
    model = figures["with_model"]
    return [
        f"backfill: {figures['model']} on {figures['device']}, {figures['texts_per_call']} texts per model call",
        *render_production(figures),
        "  with the model, on the scratch copy:",
        f"    raw encode_documents(): {_n(figures['encode_texts_per_s'], 1)} texts/s (in the engine's batches of "
        f"{figures['engine_batch_size']:,} rows)",
        f"    backfill engine:        {_n(figures['backfill_rows_per_s'], 1)} rows/s "
        f"({model['rows_embedded']:,} rows in {model['seconds']:.1f} s) = {figures['ratio']:.2f}x raw encode",
        f"    (raw encode and the engine alternate {figures['rounds']} times; each figure is its best run)",
        *_targets(figures),
    ]


def _per_type(types, cell):
    return [cell(figures) for figures in types.values()]


def _build_cell(figures):
    build = figures["index_build"]
    fitted = "graph fitted" if build["graph_fitted_in_memory"] else "graph did NOT fit"
    return f"{build['maintenance_work_mem_human']} ({fitted}), {build['parallel_workers']} workers"


def _search_overview(figures, types):
    legacy = figures["legacy_column_bytes"]
    rows = [
        ["load (binary COPY)", *_per_type(types, lambda t: f"{t['load_s']:.1f} s, {_n(t['load_rows_per_s'])} rows/s")],
        ["HNSW build", *_per_type(types, lambda t: f"{t['index_build_s']:.1f} s")],
        ["build settings", *_per_type(types, _build_cell)],
        ["index size", *_per_type(types, lambda t: f"{t['index_mb']:,.0f} MB")],
        ["vector bytes per row", *_per_type(types, lambda t: f"{t['column_bytes_per_row']:,.0f} "
                                            f"({t['share_of_legacy_column']:.1%} of legacy)")],
        ["table bytes per row", *_per_type(types, lambda t: f"{t['table_bytes_per_row']:,.0f}")],
        ["exact search p50 (SQL)", *_per_type(types, lambda t: f"{t['exact_p50_ms']:.1f} ms")],
        ["HNSW index used", *_per_type(types, lambda t: "yes" if t["index_used"] else "NO")],
    ]
    return [*_table(["", *_per_type(types, lambda t: t["type"])], rows),
            f"  legacy: a 1536-dim vector takes {legacy:,} bytes; shared_buffers {figures['shared_buffers_mb']:,.0f} MB "
            "(an index larger than it is read through the OS cache)"]


def _sweep_table(types):
    header, rows = ["ef_search"], []
    for name, figures in types.items():
        header += [f"{name} p50", "p95", "recall@10"] + (["vs float32"] if name != "vector" else [])
    for i, entry in enumerate(next(iter(types.values()))["sweep"]):
        row = [entry["ef_search"]]
        for name, figures in types.items():
            point = figures["sweep"][i]
            row += [f"{point['p50_ms']:.2f}", f"{point['p95_ms']:.2f}", f"{point['recall_at_10']:.3f}"]
            if name != "vector":
                row.append(f"{point['recall_at_10_vs_float32']:.3f}")
        rows.append(row)
    return _table(header, rows)


def _operating_points(types):
    lines = []
    for name, figures in types.items():
        for key in (key for key in figures if key.startswith("at_recall_")):
            point, target = figures[key], key.removeprefix("at_recall_")
            found = "smallest ef_search reaching" if point["reached"] else "NOT reached; best"
            lines.append(f"  {name}, recall {target} {found}: ef_search {point['ef_search']}, p50 {point['p50_ms']:.2f} ms, "
                         f"p95 {point['p95_ms']:.2f} ms, recall@10 {point['recall_at_10']:.3f}")
    return lines


def _filtered_table(types):
    first = next(iter(types.values()))["filtered"]
    header, rows = ["filter", "iterative scan"], []
    for name in types:
        header += [f"{name} p50", "p95", "recall@10", "rows min/mean"]
    for i, entry in enumerate(first["filters"]):
        for mode in first["modes"]:
            row = [f"{entry['filter']} ({entry['rows_matching']:,})", mode]
            for figures in types.values():
                result = figures["filtered"]["filters"][i]["modes"].get(mode)
                row += ["-"] * 4 if result is None else [
                    f"{result['p50_ms']:.2f}", f"{result['p95_ms']:.2f}", f"{result['recall_at_10']:.3f}",
                    f"{result['rows_min']}/{result['rows_mean']:.1f}"]
            rows.append(row)
    efs = ", ".join(f"{name} {figures['filtered']['ef_search']}" for name, figures in types.items())
    used = "yes" if all(figures["filtered"]["index_used"] for figures in types.values()) else "NO"
    return [f"  filtered searches (WHERE video_id = X, no btree on it), ef_search: {efs}; hnsw.max_scan_tuples "
            f"{first['max_scan_tuples']:,}; {first['k']} rows asked; HNSW index used: {used}",
            *_table(header, rows, left=(0, 1))]


def _derived_check(check):
    sets = check["sets"]
    rows = [[entry["ef_search"], *[f"{figures['sweep'][i]['recall_at_10']:.3f}" for figures in sets.values()]]
            for i, entry in enumerate(sets["real"]["sweep"])]
    differences = ", ".join(f"{name} {value:.3f}" for name, value in check["largest_recall_difference"].items())
    distances = ", ".join(f"{name} {figures['mean_distance_at_10']:.3f}" for name, figures in sets.items())
    return [
        f"  derived vectors checked against {check['real_vectors']:,} real ones ({check['queries']} real queries), "
        "recall@10:",
        *_table(["ef_search", *sets], rows, indent="    "),
        f"    largest recall difference from the real vectors: {differences}",
        f"    mean cosine distance from a query to its 10th neighbour: {distances}",
    ]


def render_search(figures):
    types = figures["types"]
    first = next(iter(types.values()))
    lines = [
        f"search: {figures['rows']:,} rows, {first['index']} on each type",
        f"  vectors: {figures['vectors_source']}",
        f"  {figures['queries']} queries: {figures['query_vectors']}",
        *_search_overview(figures, types),
        *_sweep_table(types),
        *_operating_points(types),
        *_filtered_table(types),
        f"  filter column: {figures['filter_assignment']}",
    ]
    for name, t in types.items():
        lines.append(f"  {name} with query encoding ({t['with_encoding_queries']} queries): p50 "
                     f"{t['with_encoding_p50_ms']:.1f} ms, p95 {t['with_encoding_p95_ms']:.1f} ms with "
                     f"{t['with_encoding_torch_threads']} torch threads; p50 {t['with_encoding_one_thread_p50_ms']:.1f} ms, "
                     f"p95 {t['with_encoding_one_thread_p95_ms']:.1f} ms with 1")
    for name, t in types.items():
        build = t["index_build"]
        lines.append(f"  {name} build: maintenance_work_mem {build['maintenance_work_mem_human']} "
                     f"({build['maintenance_work_mem_why']}); workers {build['parallel_workers']} "
                     f"({build['parallel_workers_why']})")
    if "derived_check" in figures:
        lines += _derived_check(figures["derived_check"])
    return lines + _targets(figures)


def render_rerank(figures):
    if figures.get("skipped"):
        return [f"rerank: skipped: {figures['skipped']}"]
    return [
        f"rerank: {figures['model']} on {figures['device']}, {figures['batch_size']} pairs per call",
        f"  {_n(figures['pairs_per_s'], 1)} pairs/s: {figures['ms_per_query']:,.0f} ms to rerank "
        f"{figures['top_k']} candidates ({figures['rerankings']} reranking(s) timed)",
        *[f"  note: {note}" for note in figures.get("notes", [])],
    ]


def _seconds(ms):
    return "-" if ms is None else f"{ms / 1000:,.2f} s"


def _latency_row(name, side):
    latency = side["latency_ms"]
    return [name, _seconds(latency["p50"]), _seconds(latency["p95"]), _seconds(latency["p99"]),
            _seconds(latency["max"]), f"{side['with_vector']:,}", f"{side['missing']:,}", f"{side['superseded']:,}"]


def render_arrival(figures):
    follower, reference = figures["follower"], figures["reference"]
    rss, stop, writer = follower["rss"], follower["stop"], follower["writer"]
    slope, second_half = (("-" if value is None else f"{value:+.2f} MB/min")
                          for value in (rss["slope_mb_per_min"], rss["slope_second_half_mb_per_min"]))
    exit_code = "none (still running)" if stop["exit_code"] is None else stop["exit_code"]
    lines = [
        f"arrival: commit-to-vector latency, {figures['model']} on {figures['device']} ({figures['model_chosen']})",
        f"  {figures['arrivals']:,} arrivals at {figures['arrival_rate']:g}/s for {figures['arrival_seconds']:g} s "
        f"({figures['inserts']:,} inserts, {figures['edits']:,} text edits, each its own transaction; the writer "
        f"was at most {writer['late_max_ms']:,.0f} ms late), on a scratch copy of {figures['table_rows']:,} segments "
        f"({figures['rows_source']}); then up to {figures['grace_seconds']:g} s for the last vectors",
        *_table(["", "p50", "p95", "p99", "max", "with vector", "missing", "superseded"], [
            _latency_row(f"follower ({follower['mode']})", follower),
            _latency_row("reference (backfill runs back to back)", reference)]),
        "  latency: from the arrival's COMMIT to the COMMIT of its vector, both on the server's clock",
        f"  follower: {follower['passes']:,} passes embedded something, {_n(follower['segments_per_pass'], 1)} "
        f"segments each on average, a pass p50 {_n(follower['pass_seconds_p50'], 2)} s, p95 "
        f"{_n(follower['pass_seconds_p95'], 2)} s; it followed {follower['start_seconds']:.1f} s after its start "
        f"(model loaded in {_n(follower['model_load_seconds'], 1)} s)",
        f"  follower memory (RSS): {rss['start_mb']:,.0f} MB when it followed, at most {rss['max_mb']:,.0f} MB, "
        f"{rss['end_mb']:,.0f} MB at the end; slope {slope} over {rss['over_s']:.0f} s, {second_half} over its "
        f"second half (sampled every {rss['sample_every_s']:g} s)",
        f"  follower stop: SIGTERM -> exit status {exit_code} after {stop['seconds']:.2f} s"
        + (" (the batch in hand abandoned)" if stop["batch_abandoned"] else ""),
        f"  reference: {reference['runs']:,} runs of the engine, each a new process loading the model, back to back: "
        f"{_n(reference['run_seconds_mean'], 1)} s each on average (model load "
        f"{_n(reference['model_load_seconds_mean'], 1)} s), {_n(reference['segments_per_run'], 1)} segments per run",
        f"  machine load average (1 min): {figures['load_average'][0]:.1f} when the suite began, "
        f"{figures['load_average'][1]:.1f} at its end",
    ]
    return lines + _targets(figures)


def _ms_triplet(latency):
    return "-" if not latency["count"] else f"{latency['p50']:.2f} / {latency['p95']:.2f} / {latency['p99']:.2f}"


LIVE_SITE_PHASES = (("idle", "idle: the application alone"), ("unthrottled", "beside an unthrottled backfill"),
                    ("throttled", "beside a throttled backfill"))


def render_live_site(figures):
    app = figures["application"]
    rows = []
    for key, label in LIVE_SITE_PHASES:
        side = figures["phases"][key]
        engine = side.get("backfill") or {}
        latency = side["latency_ms"]
        rows.append([label, _ms_triplet(latency["read"]), _ms_triplet(latency["search"]),
                     _ms_triplet(latency["insert"]), _n(engine.get("rows_per_s")),
                     _n(engine.get("wal_bytes_per_row")), _n(side["wal_bytes"] / side["seconds"] / 2**20, 1)
                     if side["seconds"] else "-", "-" if side["replica_lag_max_s"] is None else
                     f"{side['replica_lag_max_s']:.2f} s"])
    throttled = figures["phases"]["throttled"].get("backfill") or {}
    waits = [line for line in throttled.get("throttle_said", []) if line.startswith("Waiting:")]
    lag = figures["max_replica_lag"]
    lines = [
        f"live-site: the application's latency (ms, p50 / p95 / p99) beside the backfill, {figures['seconds']:g} s "
        f"a phase, on a scratch copy of {figures['rows']:,} segments ({figures['rows_source']})",
        f"  the application: {app['rounds_per_s']:g} rounds/s of a read by id, a search (top {app['top_k']} of "
        f"{app['search_rows']:,} {app['dimensions']}-dim vectors, HNSW, ef_search {app['ef_search']}) and an insert; "
        f"the backfill: the engine with a zero-cost encoder in a process of its own",
        *_table(["", "read", "search", "insert", "backfill rows/s", "WAL B/row", "WAL MB/s", "replica lag max"],
                rows),
        f"  throttled: --max-rows-per-second {figures['rate_cap']:,g}, replica lag limit "
        f"{lag if lag == 'off' else f'{lag:g} s'}" + (f"; it waited {len(waits)} time(s): {waits[0]}" if waits else ""),
        "  WAL B/row: the phase's WAL less the application's own sessions', over the rows written; "
        "checkpoints in the phases: " + ", ".join(f"{key} {figures['phases'][key].get('checkpoints', '-')}"
                                                  for key, _ in LIVE_SITE_PHASES),
        f"  machine load average (1 min): {figures['load_average'][0]:.1f} when the suite began, "
        f"{figures['load_average'][1]:.1f} at its end",
    ]
    if all(figures["phases"][key]["replicas"] == 0 for key, _ in LIVE_SITE_PHASES):
        lines.append("  no streaming replica: the replica lag limit had nothing to watch")
    return lines


def render_remote(figures):
    from benchmark.remote import lock_wait

    rows = []
    for run, ratio in zip(figures["round_trips"], figures["ratios"]):
        engine, follower = run["engine"], run["follower"]
        rows.append([f"{run['asked_ms']:g} ({run['measured_ms']:.0f})",
                     f"{_n(engine['zero_cost']['rows_per_s'])} ({ratio['engine_zero_cost']:.2f}x)",
                     f"{_n(engine['simulated_gpu']['rows_per_s'])} ({ratio['engine_simulated_gpu']:.2f}x)",
                     _n(engine["simulated_gpu"]["rows_per_s_with_start"]),
                     f"{_n(follower['p95_s'], 2)} s ({follower['embedded']}/{follower['arrivals']})",
                     f"{_n(run['swap']['app_slowest_insert_ms'], 1)} / {_n(run['undo']['app_slowest_insert_ms'], 1)}",
                     f"{_n(lock_wait(run['swap']), 1)} / {_n(lock_wait(run['undo']), 1)}",
                     f"{run['contract_s']:.1f} ({ratio['contract']:.2f}x)",
                     f"{run['verify_s']:.1f} / {run['status_s']:.1f} ({ratio['verify']:.2f}x / {ratio['status']:.2f}x)"])
    return [
        f"remote: the switch run through a delay proxy, the application next to the database ({figures['model']}; "
        f"engine {figures['engine_rows']:,} segments, simulated GPU {figures['simulated_gpu_texts_per_s']:,g} "
        f"texts/s; switch {figures['switch_rows']:,} segments; the application {figures['app_inserts_per_s']:g} "
        "inserts/s)",
        *_table(["round trip ms (measured)", "engine rows/s, zero-cost", "simulated GPU", "with its start",
                 "follower p95", "app's worst wait, swap / undo ms", "of it behind the lock, ms", "contract s",
                 "verify / status s"], rows),
        "  x: against round trip 0, measured beside it through a proxy that adds no delay; the engine's rate is its "
        "pass's, 'with its start' counts the worker's connections and ledger checks too"
        + (f"; each the median of {figures['engine_runs']} runs" if figures.get("engine_runs", 1) > 1 else ""),
        "  app's worst wait: its slowest insert while the command ran (on this machine the command, the proxy, the "
        "database and the application share its cores); behind the lock: the slowest insert running while the "
        "server held the writes, or the longest the application's session was seen blocked by a lock",
    ] + _targets(figures)


RENDERERS = [("encode", render_encode), ("db_write", render_db_write), ("backfill", render_backfill),
             ("search", render_search), ("rerank", render_rerank), ("arrival", render_arrival),
             ("live_site", render_live_site), ("remote", render_remote)]


def render(results):
    """The results as lines of text, one section per suite run."""
    lines = render_machine(results["machine"])
    run = results.get("run", {})
    if run.get("model"):
        lines.append(f"Model: {run['model']}")
    for key, renderer in RENDERERS:
        if key in results:
            lines += ["", *renderer(results[key])]
    if run:
        lines += ["", f"Finished in {run['seconds']:.0f} s."]
    return lines


# --- comparing two runs ---------------------------------------------------------------------

HIGHER_IS_BETTER = ("per_s", "ratio", "recall", "_vs_")


def figures_of(results):
    """{"suite.key": number} for each suite's top-level numbers (lists and nested dicts left out)."""
    flat = {}
    for key, _ in RENDERERS:
        for name, value in (results.get(key) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{key}.{name}"] = value
    return flat


def better(name, old, new):
    """'better', 'worse' or '' (no direction: a setting, or no change)."""
    if new == old or name.endswith(("ef_search", "batch_size", "texts_per_call", "rows", "texts", "queries", "dimensions",
                                    "table_rows", "top_k", "pairs", "rerankings", "max_seq_length",
                                    "mean_tokens_per_text", "with_encoding_queries", "simulated_gpu_texts_per_s",
                                    "production_rounds", "rounds", "legacy_column_bytes", "shared_buffers_mb",
                                    "arrivals", "inserts", "edits", "arrival_rate", "arrival_seconds", "grace_seconds",
                                    "rate_cap", "live_site.seconds")):
        return ""
    higher = any(word in name for word in HIGHER_IS_BETTER)
    return "better" if (new > old) == higher else "worse"


def compare(old, new):
    """[{figure, old, new, change_pct, verdict}] for the figures both runs have."""
    before, after = figures_of(old), figures_of(new)
    changes = []
    for name in sorted(before.keys() & after.keys()):
        was, now = before[name], after[name]
        change = (now - was) / was * 100 if was else None
        changes.append({"figure": name, "old": was, "new": now, "change_pct": change, "verdict": better(name, was, now)})
    return changes


def render_comparison(old, new):
    """Lines describing the change from `old` to `new` results."""
    changes = compare(old, new)
    if not changes:
        return ["No figures in common with the earlier run."]
    machine_old, machine_new = old.get("machine", {}), new.get("machine", {})
    lines = ["Change against the earlier run:"]
    if (machine_old.get("cpu"), machine_old.get("gpu")) != (machine_new.get("cpu"), machine_new.get("gpu")):
        lines.append(f"  (different machines: {machine_old.get('cpu')} / {machine_old.get('gpu')} then, "
                     f"{machine_new.get('cpu')} / {machine_new.get('gpu')} now)")
    rows = [[c["figure"], _n(c["old"], 2), _n(c["new"], 2),
             "-" if c["change_pct"] is None else f"{c['change_pct']:+.1f}%", c["verdict"]] for c in changes]
    return lines + _table(["figure", "before", "now", "change", ""], rows, left=(0, 4))
