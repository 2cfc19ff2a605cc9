"""The embedding benchmark behind `manage.py embedding_benchmark`: the numbers that justify the
switch, measured side by side in one run (see runner.py for the entry point, one module per suite;
the command is management/commands/embedding_benchmark.py). A Django app of its own, with no
models: it uses the product (`segments`, `embeddings`), which never imports it. How to run each
suite, and the figures measured: docs/benchmark.md.
"""
