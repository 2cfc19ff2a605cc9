"""`--plot FILE.png`: throughput against texts per call, and recall against latency, side by side; for the remote
suite, each step's cost against the round trip to the database."""


def _encode_panel(axes, figures):
    if not figures:
        axes.text(0.5, 0.5, "encode suite not run", ha="center", va="center", transform=axes.transAxes)
        axes.set_axis_off()
        return
    for dtype in sorted({run["dtype"] for run in figures["runs"]}):
        runs = [run for run in figures["runs"] if run["dtype"] == dtype]
        axes.plot([run["texts_per_call"] for run in runs], [run["texts_per_s"] for run in runs], marker="o",
                  label=f"EmbeddingsService (pipeline), {dtype}")
        if all("st_encode_texts_per_s" in run for run in runs):
            axes.plot([run["texts_per_call"] for run in runs], [run["st_encode_texts_per_s"] for run in runs], marker=".",
                      linestyle=":", label=f"SentenceTransformer.encode(batch_size), {dtype}")
    axes.axhline(figures["baseline_texts_per_s"], color="grey", linestyle="--", label="plain encode(), fp32")
    candidates = sorted({run["texts_per_call"] for run in figures["runs"]})
    axes.set_xscale("log", base=2)
    axes.set_xticks(candidates, [str(size) for size in candidates])
    axes.minorticks_off()
    axes.set_xlabel("texts per call")
    axes.set_ylabel("texts/s")
    axes.set_ylim(bottom=0)
    axes.set_title(f"encode on {figures['device']}: {figures['texts']:,} texts", fontsize=10)
    axes.legend(fontsize=8)


def _search_panel(axes, figures):
    if not figures:
        axes.text(0.5, 0.5, "search suite not run", ha="center", va="center", transform=axes.transAxes)
        axes.set_axis_off()
        return
    for name, type_figures in (figures.get("types") or {"vector": figures}).items():
        sweep = type_figures["sweep"]
        line, = axes.plot([entry["p50_ms"] for entry in sweep], [entry["recall_at_10"] for entry in sweep],
                          marker="o", label=f"{name} p50")
        axes.plot([entry["p95_ms"] for entry in sweep], [entry["recall_at_10"] for entry in sweep], marker=".",
                  linestyle=":", color=line.get_color(), label=f"{name} p95")
        for entry in sweep:
            axes.annotate(f"ef {entry['ef_search']}", (entry["p50_ms"], entry["recall_at_10"]), fontsize=7,
                          textcoords="offset points", xytext=(4, -8))
    for target in (0.95, 0.98):  # the recall targets at 100,000 and at a million rows
        axes.axhline(target, color="grey", linestyle="--", linewidth=0.8)
    axes.set_xlabel("query latency, SQL only (ms)")
    axes.set_ylabel("recall@10 against exact search")
    axes.set_title(f"search: {figures['rows']:,} rows, HNSW ({figures['vectors']} vectors)", fontsize=10)
    axes.legend(fontsize=8, loc="lower right")


def _remote_steps_panel(axes, figures):
    """Each step's time (or rate) at each round trip, as a multiple of its own figure at round trip 0."""
    round_trips = [run["measured_ms"] for run in figures["round_trips"]]
    for key, label in (("engine_simulated_gpu", "backfill engine, simulated GPU (rate)"),
                       ("engine_zero_cost", "backfill engine, zero-cost model (rate)"),
                       ("contract", "contract (time)"), ("verify", "verify (time)"), ("status", "status (time)")):
        axes.plot(round_trips, [ratio[key] for ratio in figures["ratios"]], marker="o", label=label)
    axes.axhline(1, color="grey", linestyle="--", linewidth=0.8)
    axes.set_xlabel("round trip to the database, measured (ms)")
    axes.set_ylabel("against round trip 0 (x)")
    axes.set_ylim(bottom=0)
    axes.set_title(f"the switch from afar: {figures['switch_rows']:,} segments, engine {figures['engine_rows']:,}",
                   fontsize=10)
    axes.legend(fontsize=8)


def _remote_waits_panel(axes, figures):
    """What the application next to the database waited: its slowest insert during swap and undo, and how long an
    arrival took to be searchable."""
    round_trips = [run["measured_ms"] for run in figures["round_trips"]]
    for step in ("swap", "undo"):
        axes.plot(round_trips, [run[step]["app_slowest_insert_ms"] for run in figures["round_trips"]], marker="o",
                  label=f"application's slowest insert during {step} (ms)")
    axes.plot(round_trips, [1000 * (run["follower"]["p95_s"] or 0) for run in figures["round_trips"]], marker="s",
              label="arrival searchable, p95 (ms)")
    axes.set_xlabel("round trip to the database, measured (ms)")
    axes.set_ylabel("ms")
    axes.set_ylim(bottom=0)
    axes.set_title("what the application next to the database saw", fontsize=10)
    axes.legend(fontsize=8)


def draw(results, path):
    """Write the two panels for `results` to the image file `path`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (left, right) = pyplot.subplots(1, 2, figsize=(12, 4.5))
    if "remote" in results and not (results.get("encode") or results.get("search")):
        _remote_steps_panel(left, results["remote"])
        _remote_waits_panel(right, results["remote"])
    else:
        _encode_panel(left, results.get("encode"))
        _search_panel(right, results.get("search"))
    machine, model = results.get("machine", {}), results.get("run", {}).get("model")
    title = f"{machine.get('cpu')}, {machine.get('cores')} cores, GPU: {machine.get('gpu') or 'none'}"
    figure.suptitle(title + (f"\nmodel: {model}" if model else ""), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
