"""The transactions that keep a VACUUM from freeing what the contract has just cleared.

A VACUUM frees a row version only once no transaction can still see it: one that was open when
the row was cleared (a snapshot taken before, a transaction id assigned before) keeps the dead
legacy vectors on disk, and nothing reports it: the VACUUM succeeds and the table keeps its size.
So before each of its VACUUMs the contract waits, for a bounded time, for the transactions of this
database that started before its last write, naming each one as the concurrent index builds do
(segments/operations.py); a prepared transaction or a replication slot holding an old xmin is
named too. The wait runs on the server (segments/switch/server_loop.py, from SESSIONS_SQL); what
still holds the space after it is returned, and the contract reports it.
"""
from typing import NamedTuple

from askdrchaffee.postgres import describe_session

# Sessions of this database whose transaction began before %(since)s and holds a snapshot or a
# transaction id; never this session, never an autovacuum worker (the VACUUM's lock request
# cancels one working on segments; one analyzing another table holds its snapshot briefly).
SESSIONS_SQL = """
SELECT 'pid ' || pid, state, extract(epoch FROM now() - xact_start), application_name, left(query, %(shown)s)
FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND xact_start < %(since)s AND (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)
  AND backend_type <> 'autovacuum worker'
UNION ALL
SELECT 'prepared transaction ' || quote_literal(gid), 'prepared', extract(epoch FROM now() - prepared),
       owner::text, NULL
FROM pg_prepared_xacts WHERE database = current_database() AND prepared < %(since)s
UNION ALL
SELECT 'replication slot ' || quote_literal(slot_name), CASE WHEN active THEN 'active' ELSE 'inactive' END,
       NULL, slot_type, NULL
FROM pg_replication_slots WHERE xmin IS NOT NULL AND (database IS NULL OR database = current_database())
"""


class Holder(NamedTuple):
    who: str  # "pid 123", "prepared transaction 'x'", "replication slot 'y'"
    line: str  # who, with its state, age, application and query


def describe(who, state, seconds, application, query):
    return Holder(who, describe_session(who, state, seconds, application, query))
