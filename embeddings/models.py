from django.db import models
from django.db.models import Q


class VectorColumn(models.Model):
    """The model ledger: which embedding model's vectors a vector column holds.

    One active row per column (`retired_at` empty), written when the column's first vector is
    written (or declared, for a column whose model cannot run here), renamed with its column by
    the swap and its undo, retired by the contract. Every writer of vectors checks it before it
    writes a row, and every search before it embeds a question (embeddings/ledger.py).
    """

    table_schema = models.CharField(max_length=63)
    table_name = models.CharField(max_length=63)
    column_name = models.CharField(max_length=63)
    model_name = models.CharField(max_length=500, help_text="as configured: a Hugging Face id or a directory")
    description = models.CharField(max_length=500, blank=True, default="", help_text="what the model is")
    fingerprint = models.JSONField(null=True, blank=True,
                                   help_text="the model's vectors of a few fixed texts; empty when declared")
    dimensions = models.PositiveIntegerField()
    storage = models.CharField(max_length=20, help_text="the column's type: vector or halfvec")
    normalized = models.BooleanField(null=True, help_text="unit-length vectors; unknown when declared")
    query_instruction = models.TextField(null=True, blank=True, help_text="prefix of questions; unknown when declared")
    source = models.CharField(max_length=40, help_text="first write, declared, adopted or simulated")
    recorded_at = models.DateTimeField(auto_now_add=True)
    retired_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "embeddings_vector_column"
        constraints = [
            models.UniqueConstraint(fields=["table_schema", "table_name", "column_name"],
                                    condition=Q(retired_at__isnull=True), name="embeddings_vector_column_active"),
        ]

    def __str__(self):
        return f"{self.table_name}.{self.column_name}: {self.model_name}"
