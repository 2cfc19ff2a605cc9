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
    """The new model's vectors: `vector(n)` or `halfvec(n)` as settings.EMBEDDING_STORAGE says
    when the column is created (segments/storage.py). Both read back as numpy float32 arrays and
    take the same values (a halfvec column rounds them to float16)."""

    def db_type(self, connection):
        from segments.storage import configured

        return configured().sql_type(self.dimensions) if self.dimensions else configured().type_name
