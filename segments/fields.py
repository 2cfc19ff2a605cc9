"""Column types of `segments` that Django's own fields do not produce."""
from datetime import timezone

from django.db import models
from pgvector.django import VectorField


class SerialField(models.AutoField):
    """An `integer` primary key backed by a sequence (`serial`), as the legacy table has it.

    Django's AutoField makes an identity column instead; both hand out ids the same way.
    """

    def db_type(self, connection):
        return "serial"

    def db_type_suffix(self, connection):
        return None


class TimestampField(models.DateTimeField):
    """`timestamp without time zone` holding UTC wall-clock time (the legacy `created_at`).

    Django connects with the session time zone set to UTC, so values read back are UTC.
    """

    def db_type(self, connection):
        return "timestamp"

    def from_db_value(self, value, expression, connection):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


class CurrentTimestamp(models.Func):
    """SQL `CURRENT_TIMESTAMP`, the legacy column default."""

    template = "CURRENT_TIMESTAMP"
    output_field = models.DateTimeField()


class EmbeddingField(VectorField):
    """A model's vectors: `vector(n)` or `halfvec(n)`. The type is `storage` when given (the
    migrations of a switch written by `manage.py makeswitch` fix it), else the configured storage
    when the column is created (segments/storage.py: EMBEDDING_STORAGE, halfvec by default where
    pgvector has it). Both read back
    as numpy float32 arrays and take the same values (a halfvec column rounds them to float16).
    Without `dimensions` the column's width is not declared (the live `embedding`, whose width is
    the live model's)."""

    def __init__(self, *args, storage=None, **kwargs):
        self.storage = storage
        super().__init__(*args, **kwargs)

    def deconstruct(self):
        name, path, args, kwargs = super().deconstruct()
        if self.storage is not None:
            kwargs["storage"] = self.storage
        return name, path, args, kwargs

    def db_type(self, connection):
        from segments.storage import configured, storage_named

        storage = storage_named(self.storage) if self.storage else configured(connection)
        return storage.sql_type(self.dimensions) if self.dimensions else storage.type_name
