from django.db import models
from django.db.models import Q
from pgvector.django import HnswIndex, VectorField

from segments.fields import CurrentTimestamp, SerialField, TimestampField
from segments.schema import BLANK_TEXT_PATTERN

# The width of `segments.embedding` once the switch is done (BAAI/bge-small-en-v1.5).
# Migrations keep their own frozen copy; settings.EMBEDDING_DIMENSIONS is checked against the
# live column, never used to define it.
EMBEDDING_DIMENSIONS = 384


# HNSW build parameters (pgvector's defaults, documented in the README's runbook).
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64


class Segment(models.Model):
    """One transcript segment of a video: the table the search runs on."""

    id = SerialField(primary_key=True)
    video_id = models.CharField(max_length=255)
    start_sec = models.FloatField()
    end_sec = models.FloatField()
    text = models.TextField()
    speaker_label = models.CharField(max_length=50, null=True, blank=True)
    speaker_confidence = models.FloatField(null=True, blank=True)
    embedding = VectorField(dimensions=EMBEDDING_DIMENSIONS, null=True, blank=True, editable=False)
    avg_logprob = models.FloatField(null=True, blank=True)
    compression_ratio = models.FloatField(null=True, blank=True)
    no_speech_prob = models.FloatField(null=True, blank=True)
    temperature_used = models.FloatField(null=True, blank=True)
    metadata = models.JSONField(null=True, blank=True)
    created_at = TimestampField(db_default=CurrentTimestamp(), editable=False)
    video_type = models.CharField(max_length=20, null=True, blank=True)

    class Meta:
        db_table = "segments"
        indexes = [
            models.Index(fields=["video_id"], name="idx_segments_video_id"),
            models.Index(fields=["speaker_label"], name="idx_segments_speaker_label"),
            models.Index(fields=["video_id", "start_sec"], name="idx_segments_video_start"),
            models.Index(fields=["video_type"], name="idx_segments_video_type"),
            HnswIndex(
                fields=["embedding"],
                name="segments_embedding_hnsw",
                m=HNSW_M,
                ef_construction=HNSW_EF_CONSTRUCTION,
                opclasses=["vector_cosine_ops"],
            ),
            # Rows still waiting for a vector: keeps the backfill's scan and the swap's
            # completeness check instant on a large, mostly embedded table.
            models.Index(
                fields=["id"],
                name="segments_embedding_todo",
                condition=Q(embedding__isnull=True) & ~Q(text__regex=BLANK_TEXT_PATTERN),
            ),
        ]

    def __str__(self):
        return f"{self.video_id} @ {self.start_sec:.1f}s"
