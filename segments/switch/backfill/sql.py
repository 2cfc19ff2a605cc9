"""The SQL text of the backfill: the pending predicate, the claims, the quarantine, the counts.

Table names stay unqualified: the search_path of the engine's connections decides which schema it
works on (the benchmark's connections point it at scratch copies). Each step of the engine is one
message (askdrchaffee/round_trips.py): the statements a step needs are written to run together,
the one whose rows the step reads last.
"""
from segments.schema import blank_sql, pending_sql

CLAIM_LOCK_KEY = 7_312_514_011  # pg_advisory_xact_lock key serialising the claim step

LOCK_CLAIMS = "SELECT pg_advisory_xact_lock(%s)"  # with CLAIM_LOCK_KEY
COUNT_BLANK = f"SELECT count(*) FROM segments s WHERE {blank_sql()}"


def _failed_since(retry_quarantined):
    """On a retry, only quarantine entries recorded by this run (since %(since)s) hold a row back."""
    return " AND q.last_failed_at >= %(since)s" if retry_quarantined else ""


def quarantined_sql(retry_quarantined):
    """Rows the quarantine holds back: an entry for the same text (on a retry, only entries
    recorded by this run, so a row failing again is not retried in a loop)."""
    since = _failed_since(retry_quarantined)
    return (
        "EXISTS (SELECT 1 FROM embeddings_quarantine q "
        f"WHERE q.segment_id = s.id AND q.text_md5 = md5(s.text)::uuid{since})"
    )


def claim_sql(column, retry_quarantined=False):
    """The next pending, unclaimed, not quarantined segments after %(after)s, by id.

    The quarantine is checked by a scalar subquery, once per row the index scan yields: as
    an EXISTS, the planner may turn it into a hash join that reads every pending row past the
    cursor (and hashes their texts) for each batch when its statistics are stale, as they
    are during a backfill. This way a batch reads `limit` rows from the partial index and
    stops. (The claims check joins on a range, which only a nested loop can do.)
    """
    since = _failed_since(retry_quarantined)
    return f"""
        SELECT s.id, s.text, md5(s.text)::uuid FROM segments s
        WHERE {pending_sql(column)} AND s.id > %(after)s
          AND (SELECT q.text_md5 FROM embeddings_quarantine q WHERE q.segment_id = s.id{since})
              IS DISTINCT FROM md5(s.text)::uuid
          AND NOT EXISTS (SELECT 1 FROM embeddings_backfill_claim c WHERE s.id BETWEEN c.first_id AND c.last_id)
        ORDER BY s.id LIMIT %(limit)s
    """


def claim_message(column, retry_quarantined=False):
    """One claiming step as one message: serialised by the claim lock, the dead workers' claims dropped,
    then up to %(limit)s pending, unclaimed, not quarantined segments after %(after)s taken and cut
    into claims of %(batch)s rows (one row of embeddings_backfill_claim each, leased to worker
    %(worker)s). Its rows: (id, text, md5 of the text, claim id, None, None, None), by id; or, when
    nothing was taken, one row (None x 4, open, pending, quarantined): what the worker still waits for
    (pending and not quarantined: its own claims' rows, and others' rows of id %(horizon)s or less, the
    last id when its pass began, or all when None: rows that arrived since and that another worker
    took, a follower, are that worker's), pending, and of those quarantined, so that the worker knows
    without another round trip whether it is done."""
    waits_for = ("(%(horizon)s::bigint IS NULL OR s.id <= %(horizon)s OR EXISTS (SELECT 1 FROM "
                 "embeddings_backfill_claim c WHERE s.id BETWEEN c.first_id AND c.last_id AND c.worker_id = %(worker)s))")
    counts = (f"SELECT count(*) FILTER (WHERE NOT {quarantined_sql(retry_quarantined)} AND {waits_for}), count(*), "
              f"count(*) FILTER (WHERE {quarantined_sql(False)}) FROM segments s WHERE {pending_sql(column)}")
    return "; ".join([
        LOCK_CLAIMS % "%(key)s",
        DELETE_DEAD_CLAIMS.strip(),
        f"""WITH picked AS ({claim_sql(column, retry_quarantined).strip()}),
            numbered AS (SELECT p.*, (row_number() OVER (ORDER BY p.id) - 1) / %(batch)s AS part FROM picked p),
            me AS (SELECT a.pid, a.backend_start FROM pg_stat_activity a WHERE a.pid = pg_backend_pid()),
            claims AS (
                INSERT INTO embeddings_backfill_claim (first_id, last_id, worker_pid, worker_started_at, worker_name,
                                                       claimed_at, worker_id, expires_at)
                SELECT min(n.id), max(n.id), CASE WHEN %(session)s THEN (SELECT pid FROM me) END,
                       CASE WHEN %(session)s THEN (SELECT backend_start FROM me) END, %(name)s, now(), %(worker)s,
                       now() + %(lease)s * interval '1 second'
                FROM numbered n GROUP BY n.part
                RETURNING id, first_id, last_id)
        SELECT n.id, n.text, n.md5, c.id, NULL::bigint, NULL::bigint, NULL::bigint
        FROM numbered n JOIN claims c ON n.id BETWEEN c.first_id AND c.last_id
        UNION ALL
        SELECT NULL, NULL, NULL, NULL, counts.* FROM ({counts}) counts WHERE NOT EXISTS (SELECT 1 FROM numbered)
        ORDER BY 1""",
    ])


def prepare_message(column, blank=True):
    """A pass's first step: quarantine entries that no longer apply dropped; its row: (the run's start
    time, its quarantine cutoff; how many segments need a vector; how many are blank: None when not
    counted, a table scan a follower's pass leaves out; the last id, the pass's horizon)."""
    blank_count = f"({COUNT_BLANK})" if blank else "NULL::bigint"
    return (f"{obsolete_quarantine_sql(column).strip()}; "
            f"SELECT now(), count(*), {blank_count}, (SELECT max(id) FROM segments) "
            f"FROM segments s WHERE {pending_sql(column)}")


def final_counts_message(column, blank=True):
    """A pass's last step when its claims did not say it already: its leftover claims (%(claims)s)
    released; its row: (pending, of those quarantined, blank: None when not counted)."""
    blank_count = f"({COUNT_BLANK})" if blank else "NULL::bigint"
    return (f"DELETE FROM embeddings_backfill_claim WHERE id = ANY(%(claims)s::int[]); "
            f"SELECT count(*), count(*) FILTER (WHERE {quarantined_sql(False)}), {blank_count} "
            f"FROM segments s WHERE {pending_sql(column)}")


def count_pending_sql(column):
    """How many segments need a vector."""
    return f"SELECT count(*) FROM segments s WHERE {pending_sql(column)}"


def count_pending_and_quarantined_sql(column):
    """How many segments need a vector, and how many of those the quarantine holds back."""
    return (
        f"SELECT count(*), count(*) FILTER (WHERE {quarantined_sql(False)}) FROM segments s WHERE {pending_sql(column)}"
    )


# A claim is dead when its lease ran out, or when the database session that claimed it is gone
# (recorded only on a direct connection: behind a pooler the session outlives the worker).
DELETE_DEAD_CLAIMS = """
    DELETE FROM embeddings_backfill_claim c WHERE c.expires_at < now() OR (c.worker_pid IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM pg_stat_activity a
        WHERE a.pid = c.worker_pid AND (a.backend_start IS NULL OR a.backend_start = c.worker_started_at)))
"""
INSERT_CLAIM = """
    INSERT INTO embeddings_backfill_claim (first_id, last_id, worker_pid, worker_started_at, worker_name, claimed_at,
                                           worker_id, expires_at)
    SELECT %(first)s, %(last)s, CASE WHEN %(session)s THEN a.pid END, CASE WHEN %(session)s THEN a.backend_start END,
           %(name)s, now(), %(worker)s, now() + %(lease)s * interval '1 second'
    FROM pg_stat_activity a WHERE a.pid = pg_backend_pid()
    RETURNING id
"""
ADOPT_CLAIMS = """
    UPDATE embeddings_backfill_claim SET worker_pid = a.pid, worker_started_at = a.backend_start
    FROM pg_stat_activity a
    WHERE a.pid = pg_backend_pid() AND embeddings_backfill_claim.worker_id = %s
      AND embeddings_backfill_claim.worker_pid IS NOT NULL
"""
# A claim of this worker it never heard of: made by a claiming message whose answer a lost or silent
# link swallowed (its rows would otherwise stay claimed by a worker that does not know it holds them).
DROP_UNHEARD_CLAIMS = "DELETE FROM embeddings_backfill_claim WHERE worker_id = %s AND NOT (id = ANY(%s::int[]))"
DELETE_CLAIM = "DELETE FROM embeddings_backfill_claim WHERE id = %s"
DELETE_CLAIMS = "DELETE FROM embeddings_backfill_claim WHERE id = ANY(%s)"

QUARANTINE = """
    INSERT INTO embeddings_quarantine AS q (segment_id, text_md5, reason, attempts, first_failed_at, last_failed_at)
    SELECT f.id, f.md5, f.reason, 1, now(), now()
    FROM unnest(%s::int4[], %s::uuid[], %s::text[]) AS f(id, md5, reason)
    JOIN segments s ON s.id = f.id AND md5(s.text)::uuid = f.md5
    ON CONFLICT (segment_id) DO UPDATE SET
        attempts = CASE WHEN q.text_md5 = EXCLUDED.text_md5 THEN q.attempts + 1 ELSE 1 END,
        first_failed_at = CASE WHEN q.text_md5 = EXCLUDED.text_md5 THEN q.first_failed_at ELSE now() END,
        text_md5 = EXCLUDED.text_md5, reason = EXCLUDED.reason, last_failed_at = now()
"""


def delete_staged_claim_sql(staging_table):
    """Ends the claim of worker %s whose first row is the first row staged (a batch that holds every row of
    its claim: no two live claims begin with the same row)."""
    return (f"DELETE FROM embeddings_backfill_claim c WHERE c.worker_id = %s "
            f"AND c.first_id = (SELECT min(id) FROM {staging_table})")


def unquarantine_staged_sql(staging_table):
    """Drops the quarantine entries of the %s rows just staged (the LIMIT tells the planner
    the staging table's size, as in embeddings/writer.py)."""
    return (f"DELETE FROM embeddings_quarantine q USING (SELECT id FROM {staging_table} "
            "LIMIT %s) st WHERE q.segment_id = st.id")


def obsolete_quarantine_sql(column):
    """Entries that no longer apply: segment gone, text changed, or vector present."""
    return f"""
        DELETE FROM embeddings_quarantine q WHERE NOT EXISTS (
            SELECT 1 FROM segments s
            WHERE s.id = q.segment_id AND s.{column} IS NULL AND md5(s.text)::uuid = q.text_md5)
    """
