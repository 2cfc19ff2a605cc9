"""The trigger that keeps vectors current: a segment whose text changes loses its vectors.

Without it, an application update of `text` (plain SQL that knows nothing of embeddings) would
leave the old text's vector in place and search would serve it. With it, the row goes back to
needing a vector and the next backfill pass embeds the new text. A statement that sets the text
and a vector together (embedding at write time) keeps the vector it sets.

Before the swap it guards `embedding_384`; from the swap until the contract it guards both
`embedding` and `embedding_legacy`, so that an undo of the swap never serves a legacy vector of
a text that changed since; after the contract, `embedding` alone. The trigger is dropped and
created again rather than `CREATE OR REPLACE TRIGGER`, which PostgreSQL 13 does not have.
"""
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
