"""The contract stopped halfway and run again, and how it finds the values stored out of line."""
import pytest
from django.core.management import call_command
from django.db import connection

from segments.models import SwitchEvent
from segments.schema import embedding_schema
from segments.switch import out_of_line, steps
from segments.switch.backfill import run_backfill


@pytest.fixture
def swapped_demo(segments_at):
    """300 demo segments with legacy vectors (one very long), backfilled, indexed and swapped."""
    from embeddings.fakes import HashingEncoder
    from segments import demo_data

    segments_at("legacy")
    with connection.cursor() as cursor:
        demo_data.load(cursor.cursor, 300, seed=5, legacy_column="embedding")
    call_command("migrate", verbosity=0)  # phase 1, as a deploy runs it
    encoder = HashingEncoder()
    run_backfill(encoder)
    steps.index()
    steps.swap(encoder=encoder)


def stored(sql):
    """{id: (md5 of the text, md5 of the vector)} of every segment."""
    return {row[0]: row[1:] for row in sql("SELECT id, md5(text), md5(embedding::text) FROM segments")}


class Interrupt(Exception):
    pass


class StopAfter:
    """A progress bar that interrupts the contract once `rows` rows have been reported."""

    def __init__(self, rows):
        self.rows, self.seen = rows, 0

    def update(self, count):
        self.seen += count
        if self.seen >= self.rows:
            raise Interrupt

    def close(self):
        pass


def test_contract_interrupted_while_clearing_resumes_and_keeps_every_value(swapped_demo, sql):
    before = stored(sql)

    with pytest.raises(Interrupt):
        steps.contract(confirmed=True, batch_size=20, progress_factory=lambda total: StopAfter(50))

    (left,), = sql("SELECT count(*) FROM segments WHERE embedding_legacy IS NOT NULL")
    assert embedding_schema().phase == "swapped" and 0 < left < 300 - 50
    assert SwitchEvent.objects.filter(step="contract-started").exists()

    result = steps.contract(confirmed=True, batch_size=20)

    assert result.done and embedding_schema().phase == "final"
    assert result.details["legacy_vectors_cleared"] == left
    assert stored(sql) == before


def test_size_test_before_postgresql_17_finds_every_out_of_line_value_and_else_only_compressed_ones(swapped_demo, sql):
    columns = ("text", "embedding", "metadata")
    with connection.cursor() as cursor:
        by_size = out_of_line.Rewrite(cursor, skip={"embedding_legacy"}, server_version=160000).where
    external = " OR ".join(f"pg_column_toast_chunk_id({c}) IS NOT NULL" for c in columns)
    compressed = " OR ".join(f"pg_column_compression({c}) IS NOT NULL" for c in columns)

    found = {row[0] for row in sql(f"SELECT id FROM segments WHERE {by_size}")}
    out_of_line_rows = {row[0] for row in sql(f"SELECT id FROM segments WHERE {external}")}
    compressed_rows = {row[0] for row in sql(f"SELECT id FROM segments WHERE {compressed}")}

    assert len(out_of_line_rows) > 10  # the demo's longer segments keep their new vector out of line
    assert out_of_line_rows <= found <= out_of_line_rows | compressed_rows


def test_a_batch_blocked_by_an_application_transaction_stops_the_contract_with_the_fix(swapped_demo, sql, monkeypatch):
    from segments.switch import contract
    from segments.switch.backfill.session import open_connection

    monkeypatch.setattr(contract, "LOCK_TIMEOUT", "100ms")
    monkeypatch.setattr(contract, "LOCK_ATTEMPTS", 2)
    raw = contract.raw_connection("default")
    contract.drop_legacy_indexes(raw, out=lambda line: None)  # what the contract does before its batches
    raw.close()
    (first,), = sql("SELECT min(id) FROM segments")
    application = open_connection("default", "app")  # a transaction holding the first row's lock
    try:
        with application.cursor() as cursor:
            cursor.execute("SELECT id FROM segments WHERE id = %s FOR UPDATE", [first])
        with pytest.raises(contract.ContractInterrupted, match="contract --confirm` again when no transaction"):
            steps.contract(confirmed=True)
        (left,), = sql("SELECT count(*) FROM segments WHERE embedding_legacy IS NOT NULL")
    finally:
        application.rollback()
        application.close()
    assert embedding_schema().phase == "swapped" and left == 300  # the first batch held the first row

    steps.contract(confirmed=True)

    assert embedding_schema().phase == "final"
