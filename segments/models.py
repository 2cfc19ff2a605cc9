import uuid

from django.db import models
from django.db.models import Q
from pgvector.django import HnswIndex

from segments.fields import CurrentTimestamp, EmbeddingField, SerialField, TimestampField
from segments.schema import BLANK_TEXT_PATTERN, HNSW_EF_CONSTRUCTION, HNSW_M


class Segment(models.Model):
    """One transcript segment of a video: the table the search runs on.

    The model maps only the columns the project reads and writes. The live table has more
    (the legacy table's transcription scores and metadata, and whatever the original project
    added or renamed later, such as `speaker_conf`); they are left to the application that owns
    them, untouched (see segments/switch/preflight.py).
    """

    id = SerialField(primary_key=True)
    video_id = models.CharField(max_length=255)
    start_sec = models.FloatField()
    end_sec = models.FloatField()
    text = models.TextField()
    speaker_label = models.CharField(max_length=50, null=True, blank=True)
    # Its width is the live model's: each switch's migrations create the column, the model ledger
    # (embeddings.VectorColumn) records which model's vectors it holds.
    embedding = EmbeddingField(null=True, blank=True, editable=False)
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


class QuarantinedSegment(models.Model):
    """A segment the backfill could not embed, with the reason; it is skipped until retried.

    Kept apart from `segments` (no foreign key) so that the application's writes to that table
    never depend on this one. An entry whose segment was deleted or whose text changed no
    longer applies and is cleared by the next backfill.
    """

    segment_id = models.IntegerField(primary_key=True)
    text_md5 = models.UUIDField(help_text="md5 of the text that failed")
    reason = models.TextField()
    attempts = models.PositiveIntegerField(default=1)
    first_failed_at = models.DateTimeField(auto_now_add=True)
    last_failed_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "embeddings_quarantine"
        verbose_name = "quarantined segment"

    def __str__(self):
        return f"segment {self.segment_id}: {self.reason}"


class BackfillClaim(models.Model):
    """A range of segment ids one backfill worker is embedding right now.

    A claim is held until `expires_at`, which the worker's heartbeat keeps pushing forward; a claim
    whose lease ran out, or whose claiming database session is gone (`worker_pid`,
    `worker_started_at` as in pg_stat_activity, on a direct connection), belongs to a dead worker
    and is taken over. Behind a pooler the session says nothing (the pooler keeps it open), and
    the lease decides alone.
    """

    first_id = models.IntegerField()
    last_id = models.IntegerField()
    worker_pid = models.IntegerField(null=True)
    worker_started_at = models.DateTimeField(null=True)
    worker_name = models.CharField(max_length=255, help_text="host:pid of the worker process")
    claimed_at = models.DateTimeField(auto_now_add=True)
    worker_id = models.UUIDField(null=True, help_text="the worker run (segments_backfill_worker) holding it")
    expires_at = models.DateTimeField(null=True, help_text="the lease: taken over after this")

    class Meta:
        db_table = "embeddings_backfill_claim"

    def __str__(self):
        return f"ids {self.first_id}..{self.last_id} by {self.worker_name}"


class SwitchEvent(models.Model):
    """One step of the switch as it happened: what, when, and its figures (JSON).

    Written by the switch's steps (expand, index, swap, undo, contract), read by
    `embedding_status` and the demo (the table's size before the switch, the swap's lock time).
    """

    step = models.CharField(max_length=40)
    at = models.DateTimeField(auto_now_add=True)
    details = models.JSONField(default=dict)

    class Meta:
        db_table = "segments_switch_event"
        ordering = ["at", "id"]

    def __str__(self):
        return f"{self.step} at {self.at:%Y-%m-%d %H:%M:%S}"


class EmbeddingSwitch(SwitchEvent):
    """The admin's "Embedding switch" page: where the switch stands, over its events (no table)."""

    class Meta:
        proxy = True
        verbose_name = verbose_name_plural = "embedding switch"


class BackfillWorker(models.Model):
    """One backfill worker's or follower's run, as it goes: its heartbeat.

    Written by the worker's write stage in the same transaction as each batch (so `rows_done` is
    exactly what was committed), and every few seconds by its heartbeat thread (`updated`, which
    also renews its claims); read by `embedding_status` and the admin for each worker's mode,
    model, device, last batch, rows/s and the ETA. The worker is alive while `updated` is recent
    and `finished` is empty.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    worker_name = models.CharField(max_length=255, help_text="host:pid of the worker process")
    pid = models.IntegerField(null=True, help_text="the writer's database session, as in pg_stat_activity")
    backend_start = models.DateTimeField(null=True)
    device = models.CharField(max_length=40, null=True, blank=True, help_text="where the model runs")
    rows_done = models.BigIntegerField(default=0)
    started = models.DateTimeField()
    updated = models.DateTimeField()
    finished = models.DateTimeField(null=True, blank=True)
    mode = models.CharField(max_length=40, default="backfill", help_text="backfill, or follow (listen or poll)")
    model_name = models.CharField(max_length=500, blank=True, default="", help_text="the model it embeds with")
    column = models.CharField(max_length=63, blank=True, default="", help_text="the column it writes now")
    last_batch_at = models.DateTimeField(null=True, blank=True)
    last_batch_rows = models.IntegerField(null=True, blank=True)
    recent_rows_per_s = models.FloatField(null=True, blank=True, help_text="over the last minute")
    round_trip_ms = models.FloatField(null=True, blank=True, help_text="its measured round trip to the database")
    batches_in_flight = models.IntegerField(null=True, blank=True, help_text="batches sent and not yet committed")
    waiting_for = models.CharField(max_length=300, blank=True, default="", db_default="",
                                   help_text="why it holds its writes back now (paused, a replica's lag, a rate cap)")

    class Meta:
        db_table = "segments_backfill_worker"

    def __str__(self):
        return f"{self.worker_name}: {self.rows_done} rows"


class SwitchPause(models.Model):
    """The operator's pause of the switch's bulk writes (`embedding_switch pause` / `resume`): while a
    row is here, every backfill worker and contract, on every machine, holds its writes back."""

    scope = models.CharField(max_length=20, primary_key=True, default="all")
    reason = models.TextField(blank=True, default="")
    paused_by = models.CharField(max_length=255, blank=True, default="", help_text="host:pid of the command")
    paused_at = models.DateTimeField()

    class Meta:
        db_table = "segments_switch_pause"

    def __str__(self):
        return f"paused since {self.paused_at:%Y-%m-%d %H:%M:%S}"


class PendingSince(models.Model):
    """Since when a segment has waited for a vector: stamped by a trigger when a segment is
    inserted or its text changes (segments/triggers.py), so that `embedding_status` can give the
    age of the oldest segment with text and no current vector. Entries of segments that have their
    vectors are ignored, and cleared from time to time by the follower."""

    segment_id = models.IntegerField(primary_key=True)
    since = models.DateTimeField()

    class Meta:
        db_table = "segments_pending_since"
