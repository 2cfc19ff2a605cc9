"""The trigger that keeps vectors current: a segment whose text changes loses its new vector.

Without it, an application update of `text` (plain SQL that knows nothing of embeddings) would
leave the old text's vector in place and search would serve it. With it, the row goes back to
needing a vector and the next backfill pass embeds the new text. A statement that sets the text
and the vector together (embedding at write time) keeps the vector it sets.
"""
FUNCTION = "segments_clear_stale_embedding"


def create_sql(column):
    """SQL creating (or replacing) the function for vector column `column`, and its trigger."""
    return f"""
CREATE OR REPLACE FUNCTION {FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.{column} IS NOT DISTINCT FROM OLD.{column} THEN
        NEW.{column} := NULL;
    END IF;
    RETURN NEW;
END
$$;
CREATE OR REPLACE TRIGGER {FUNCTION} BEFORE UPDATE OF text ON segments
    FOR EACH ROW WHEN (OLD.text IS DISTINCT FROM NEW.text)
    EXECUTE FUNCTION {FUNCTION}();
"""


DROP_SQL = f"DROP TRIGGER IF EXISTS {FUNCTION} ON segments; DROP FUNCTION IF EXISTS {FUNCTION}();"
