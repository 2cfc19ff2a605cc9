"""Where each stage of a run spends its time: working, waiting for input, waiting for room.

A pipeline runs at the pace of its slowest stage: that stage is busy nearly all the time,
while the stages before it wait for room in its queue and the stages after it wait for input.
Each stage thread keeps a StageClock; the run sums the clocks of a stage's threads (the write
stage may have several) and names the stage whose threads were busiest as the one that limits.
"""
import time
from contextlib import contextmanager
from dataclasses import dataclass

# What each stage's busy time is spent on, for the report.
STAGE_WORK = {
    "claim": "reading and claiming the next pending rows",
    "encode": "encoding texts into vectors",
    "write": "writing vectors (COPY, UPDATE, commit)",
}


@dataclass
class StageClock:
    """Seconds one stage thread spent busy, waiting for input, and waiting for room downstream."""

    busy: float = 0.0
    waiting_for_input: float = 0.0
    waiting_for_room: float = 0.0

    @contextmanager
    def timing(self, what):
        """Add the block's duration to `what` ("busy", "waiting_for_input" or "waiting_for_room")."""
        started = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, what, getattr(self, what) + time.perf_counter() - started)


def stage_figures(clocks, seconds):
    """{stage: figures} for {stage: [StageClock of each of its threads]} over a run of `seconds`.

    `busy_share` is the share of its threads' time the stage spent working: near 1.0 for the
    stage that limits the run.
    """
    figures = {}
    for stage, threads in clocks.items():
        busy = sum(clock.busy for clock in threads)
        figures[stage] = {
            "threads": len(threads),
            "busy_s": round(busy, 3),
            "waiting_for_input_s": round(sum(clock.waiting_for_input for clock in threads), 3),
            "waiting_for_room_s": round(sum(clock.waiting_for_room for clock in threads), 3),
            "busy_share": round(busy / (seconds * len(threads)), 3) if seconds > 0 and threads else 0.0,
        }
    return figures


def limiting_stage(figures):
    """The stage whose threads were busy the largest share of the run, or None with no figures."""
    if not figures:
        return None
    return max(figures, key=lambda stage: figures[stage]["busy_share"])
