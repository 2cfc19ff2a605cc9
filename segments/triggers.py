"""The project's triggers on `segments`.

**Staleness** (`create_sql`): a segment whose text changes loses its vectors.

Without it, an application update of `text` (plain SQL that knows nothing of embeddings) would
leave the old text's vector in place and search would serve it. With it, the row goes back to
needing a vector and the next backfill pass embeds the new text. A statement that sets the text
and a vector together (embedding at write time) keeps the vector it sets.

Before the swap it guards `embedding_384`; from the swap until the contract it guards both
`embedding` and `embedding_legacy`, so that an undo of the swap never serves a legacy vector of
a text that changed since; after the contract, `embedding` alone. The trigger is dropped and
created again rather than `CREATE OR REPLACE TRIGGER`, which PostgreSQL 13 does not have.

**Arrival** (`ARRIVAL_SQL`, migration 0009): when a segment is inserted or its text changes, a row
trigger stamps it in `segments_pending_since` (the age of the oldest waiting segment, for
`embedding_status`) and a statement trigger sends one `NOTIFY segments_embedding` per statement
(delivered at commit, once per transaction), which wakes `backfill_embeddings --follow` at once.
The stamping function runs with its owner's rights, so that the application's role needs no
privilege on that table.
"""
from segments.schema import BLANK_TEXT_PATTERN

FUNCTION = "segments_clear_stale_embedding"


def create_sql(*columns):
    """SQL creating (or replacing) the function that clears the vector `columns`, and its trigger."""
    clears = "".join(
        f"""
    IF NEW.{column} IS NOT DISTINCT FROM OLD.{column} THEN
        NEW.{column} := NULL;
    END IF;"""
        for column in columns
    )
    return f"""
CREATE OR REPLACE FUNCTION {FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN{clears}
    RETURN NEW;
END
$$;
DROP TRIGGER IF EXISTS {FUNCTION} ON segments;
CREATE TRIGGER {FUNCTION} BEFORE UPDATE OF text ON segments
    FOR EACH ROW WHEN (OLD.text IS DISTINCT FROM NEW.text)
    EXECUTE FUNCTION {FUNCTION}();
"""


DROP_SQL = f"DROP TRIGGER IF EXISTS {FUNCTION} ON segments; DROP FUNCTION IF EXISTS {FUNCTION}();"


ARRIVAL = "segments_embedding_arrival"
NOTIFY = "segments_notify_arrival"
CHANNEL = "segments_embedding"  # the channel `backfill_embeddings --follow` listens on
PROJECT_TRIGGERS = (FUNCTION, ARRIVAL, NOTIFY)

ARRIVAL_SQL = f"""
CREATE OR REPLACE FUNCTION {ARRIVAL}() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.text IS NOT DISTINCT FROM OLD.text THEN
        RETURN NULL;
    END IF;
    IF NEW.text !~ '{BLANK_TEXT_PATTERN}' THEN
        INSERT INTO segments_pending_since (segment_id, since) VALUES (NEW.id, now())
        ON CONFLICT (segment_id) DO UPDATE SET since = EXCLUDED.since;
    END IF;
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS {ARRIVAL} ON segments;
CREATE TRIGGER {ARRIVAL} AFTER INSERT OR UPDATE OF text ON segments
    FOR EACH ROW EXECUTE FUNCTION {ARRIVAL}();
CREATE OR REPLACE FUNCTION {NOTIFY}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', '');
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS {NOTIFY} ON segments;
CREATE TRIGGER {NOTIFY} AFTER INSERT OR UPDATE OF text ON segments
    FOR EACH STATEMENT EXECUTE FUNCTION {NOTIFY}();
"""
DROP_ARRIVAL_SQL = f"""
DROP TRIGGER IF EXISTS {ARRIVAL} ON segments; DROP FUNCTION IF EXISTS {ARRIVAL}();
DROP TRIGGER IF EXISTS {NOTIFY} ON segments; DROP FUNCTION IF EXISTS {NOTIFY}();
"""
