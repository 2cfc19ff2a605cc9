import time
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError
from django.db import connection, transaction

from embeddings import ledger
from segments import demo_data
from segments.schema import TABLE, SchemaNotReady, embedding_schema, vector_column_types

# What the model ledger records for the demo's random legacy vectors: no model wrote them, and
# the ledger refuses to search them.
SIMULATED = "simulated"


def simulated_identity(dimensions):
    return ledger.ModelIdentity("random unit vectors", dimensions, None,
                                "simulated demo vectors, random: they mean nothing", True, None)


class Command(BaseCommand):
    help = "Fill the segments table with deterministic, realistic demo transcript segments."

    def add_arguments(self, parser):
        parser.add_argument("--count", type=int, default=2000, help="Segments to add (default 2000).")
        parser.add_argument("--seed", type=int, default=0, help="Same seed, same segments (default 0).")
        vectors = parser.add_mutually_exclusive_group()
        vectors.add_argument(
            "--no-legacy-vectors", action="store_true",
            help="Leave the legacy 1536-dim column empty instead of filling it with simulated vectors.",
        )
        vectors.add_argument(
            "--legacy-model", metavar="PATH",
            help="Fill the legacy column with this model's vectors of the texts instead of random ones, and "
                 "record it in the model ledger, so the old search can run (set LEGACY_EMBEDDING_MODEL to it). "
                 "A sentence-transformers directory or Hugging Face id of the column's width: "
                 "`manage.py build_standin_model` makes one.",
        )

    def handle(self, *args, count, seed, no_legacy_vectors, legacy_model, **options):
        if count < 1:
            raise CommandError("--count must be at least 1.")
        try:
            schema = embedding_schema()
        except SchemaNotReady as exc:
            raise CommandError(str(exc)) from None
        legacy_column = None if no_legacy_vectors else schema.legacy_column
        if legacy_model and legacy_column is None:
            raise CommandError(f"segments has no legacy column at phase {schema.phase}: the contract dropped it, "
                               "so there is no old search to fill for.")
        encoder = identity = None
        if legacy_column:
            type_name = vector_column_types()[legacy_column][0]
            encoder, identity = self._model(legacy_model, legacy_column, schema.legacy_dimensions)
            self._ensure_ledger()
        started = time.perf_counter()
        with transaction.atomic(), connection.cursor() as cursor:
            if legacy_column:
                cursor.execute(f"LOCK TABLE {TABLE} IN ROW EXCLUSIVE MODE")
                self._record(cursor, legacy_column, identity, type_name, SIMULATED if encoder is None else "first write")
            demo_data.load(cursor.cursor, count, seed=seed, legacy_column=legacy_column, encoder=encoder,
                           type_name=type_name if legacy_column else "vector")
        seconds = time.perf_counter() - started
        if legacy_column is None:
            vectors = ""
        elif encoder is None:
            vectors = f", simulated legacy vectors in {legacy_column}"
        else:
            vectors = f", {legacy_column} embedded by {identity.name}"
        self.stdout.write(self.style.SUCCESS(
            f"Loaded {count:,} demo segments in {seconds:.1f} s ({count / seconds:,.0f} rows/s{vectors})."
        ))
        if encoder is not None:
            self.stdout.write(f"The model ledger records {identity} for segments.{legacy_column}. To search it (the "
                              f"old side of `manage.py compare_search` and the admin's Compare searches), set\n"
                              f"    LEGACY_EMBEDDING_MODEL={identity.name}")

    def _model(self, name, column, dimensions):
        """(encoder, ModelIdentity): `name`'s service (None for simulated vectors), loaded and checked
        against the column's width."""
        from embeddings.encoder import get_service

        if not name:
            return None, simulated_identity(dimensions)
        path = Path(name).expanduser()
        if path.is_dir():
            name = str(path.resolve())  # LEGACY_EMBEDDING_MODEL must name it the same way from anywhere
        encoder = get_service(model_name=name, dimensions=dimensions)
        try:
            identity = ledger.identity_of(encoder)  # loads the model
        except ImproperlyConfigured as exc:
            raise CommandError(f"--legacy-model {name}: {exc}") from None
        if identity.dimensions != dimensions:
            raise CommandError(f"--legacy-model {name} writes {identity.dimensions}-dim vectors but segments.{column} "
                               f"holds {dimensions}: choose a model of that width (`manage.py build_standin_model OUT "
                               f"--dimensions {dimensions}` makes one).")
        return encoder, identity

    def _ensure_ledger(self):
        """The model ledger's table, which phase 1 brings; before it (the legacy phase) its own migrations
        (the ones a plain `migrate` applies first) are applied, so the legacy vectors are recorded."""
        from segments.switch import gate

        if ledger.LEDGER not in connection.introspection.table_names():
            gate.migrate_to("0003_vector_column", app="embeddings")

    def _record(self, cursor, column, identity, storage, source):
        """Record what writes the legacy column. Another model's entry, or a declaration by name, is retired
        when the column holds no vector yet (phase 1 declares LEGACY_EMBEDDING_MODEL for it); with another
        model's vectors in it, the load is refused."""
        recorded = ledger.entry(cursor, TABLE, column)
        same = recorded is not None and self._same(recorded, identity, source)
        declared = recorded is not None and recorded.source == "declared" and source != SIMULATED
        if recorded is not None and (not same or declared):
            cursor.execute(f"SELECT EXISTS (SELECT 1 FROM {TABLE} WHERE {column} IS NOT NULL)")
            holds_vectors = cursor.fetchone()[0]
            if holds_vectors and not same:
                raise CommandError(
                    f"segments.{column} already holds vectors of {recorded} and this load would add {identity}'s: "
                    "two models in one column rank by meaningless distances. Load into an empty table, or pass "
                    "--no-legacy-vectors.")
            if not holds_vectors:  # a declaration by name (or another model's) for no vector: the model itself
                ledger.retire(cursor, TABLE, column)
        if source == SIMULATED:
            ledger.record(cursor, TABLE, column, identity, storage, SIMULATED)
            return
        try:
            written = ledger.column_for_writer(cursor, TABLE, column, identity, lambda: storage, retired_ok=True)
        except ledger.ModelMismatch as exc:
            raise CommandError(str(exc)) from None
        if written != column:
            raise CommandError(f"The model ledger records {identity} for segments.{written}, not the legacy column "
                               f"segments.{column}: one model's vectors belong in one column. Choose another model.")

    @staticmethod
    def _same(recorded, identity, source):
        if source == SIMULATED or recorded.source == SIMULATED:
            return source == recorded.source
        return ledger.same_model(identity, recorded.identity)[0]
