from django.db import models


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

    The worker is identified by its database session (`worker_pid`, `worker_started_at` as in
    pg_stat_activity): when that session is gone, the worker is dead and its claim is taken over.
    """

    first_id = models.IntegerField()
    last_id = models.IntegerField()
    worker_pid = models.IntegerField()
    worker_started_at = models.DateTimeField()
    worker_name = models.CharField(max_length=255, help_text="host:pid of the worker process")
    claimed_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "embeddings_backfill_claim"

    def __str__(self):
        return f"ids {self.first_id}..{self.last_id} by {self.worker_name}"
