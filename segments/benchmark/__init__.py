"""The embedding benchmark behind `manage.py embedding_benchmark`: the numbers that justify the
switch, measured side by side in one run (see runner.py for the entry point, one module per suite).
"""
