"""What a backfill run returns (BackfillReport) or raises (BackfillError)."""
from dataclasses import asdict, dataclass, field


class BackfillError(Exception):
    """The backfill stopped before finishing; the message says why and what to do.

    `report` holds what was done until then.
    """

    def __init__(self, message, report=None):
        super().__init__(message)
        self.report = report


@dataclass
class BackfillReport:
    """What one run did, and what is left (the counts are of segments)."""

    column: str = ""
    rows_embedded: int = 0  # vectors written by this run
    rows_quarantined: int = 0  # rows this run could not embed (see embeddings_quarantine)
    rows_stale: int = 0  # vectors not written because the text changed (embedded again later)
    rows_remaining: int = 0  # segments with text and no vector at the end, quarantined included
    rows_in_quarantine: int = 0  # of rows_remaining, those quarantined
    rows_blank: int | None = 0  # segments whose text is blank: never embedded (None: not counted, a follower's pass)
    batches: int = 0
    seconds: float = 0.0
    # Per stage (claim, encode, write): threads, busy and waiting seconds, busy share (stages.py).
    stages: dict = field(default_factory=dict)
    limited_by: str | None = None  # the stage busy the largest share of the run
    writers: int = 0  # write sessions the run used (more far from the database: pipeline.writers_needed)
    round_trip_ms: float | None = None  # the worker's round trip to the database, as last measured

    @property
    def rows_per_second(self):
        return self.rows_embedded / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self):
        return {**asdict(self), "seconds": round(self.seconds, 3), "rows_per_second": round(self.rows_per_second, 1)}
