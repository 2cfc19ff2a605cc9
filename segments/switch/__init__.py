"""The switch from the legacy 1536-dim vectors to the new 384-dim ones, phase by phase.

    phase 1 expand     migrations 0002-0005, applied by any plain `manage.py migrate`
                       (preflight.py checks an existing table first; gate.py keeps `migrate`
                       from going further)
    phase 2 backfill   backfill/ (`manage.py backfill_embeddings`)
    phase 3a index     steps.index (`manage.py embedding_switch index`; migration 0006)
    check              verify.py (`manage.py verify_embeddings`)
    phase 3b swap      steps.swap, swap.py (`manage.py embedding_switch swap`; migration 0007)
    undo               steps.undo, swap.py (`manage.py embedding_switch undo`)
    phase 4 contract   steps.contract, contract.py (`manage.py embedding_switch contract --confirm`;
                       migration 0008)
    any time           status.py (`manage.py embedding_status`, the admin's panel)
    any time           throttle.py: the backfill and the contract yield to the database's health
                       (replica lag, a rate cap, `manage.py embedding_switch pause` / `resume`)

What the catalogue says about the live table is read by catalog.py and live_table.py, and
out_of_line.py finds the values stored out of line (the contract moves them); the
phase itself, and the pending and blank predicates, by segments/schema.py.
"""
