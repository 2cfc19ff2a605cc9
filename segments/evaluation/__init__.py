"""The go/no-go evaluation before the swap: the old and the new model's search on this table, side by
side, ending in a verdict the swap respects (`manage.py embedding_eval`, docs/evaluation.md).

    run.py         one evaluation, from the phase to the verdict (`evaluate`, `Options`)
    sides.py       which columns, which models, whether each runs here; the mode (models or stored)
    queries.py     known-item queries from the segments, a labelled file, the questions users asked
    searching.py   each column's own search, in batches of one round trip, timed on the server, within a budget
    metrics.py     recall@1, recall@10, MRR@10, per slice, the paired change, the agreement
    neighbours.py  the stored-vector mode: each column's neighbours from the same moment
    health.py      vectors that cannot serve a search: zero, collapsed, duplicated
    latency.py     question embedding and search latency against the index's recall, per ef_search
    verdict.py     GO, NO-GO or INCONCLUSIVE, with the reasons
    record.py      the SwitchEvent kept for each evaluation; the swap's check (`require_go`)
    candidates.py  candidate models judged on a sample, in memory, before `makeswitch`
    text.py        the report as text (the command); chart.py: the admin's charts of the last verdict
    table.py       what it reads, read-only, under a statement timeout
    stats.py       the intervals
"""
