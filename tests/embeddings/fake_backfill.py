"""`manage.py backfill_embeddings` with the HashingEncoder, for subprocess tests.

    python tests/embeddings/fake_backfill.py [backfill_embeddings options]

FAKE_ENCODER_DELAY (seconds) makes every encode call sleep, so that a run lasts long enough to
be interrupted. FAKE_BACKFILL_WRITE_AHEAD (non-empty) has the writers send each batch's message before
the batch is there, as they do far from the database, next to it too. SLOW_ENCODER_RATE (texts a second) makes it a device of that speed instead: each call
takes len(texts) / SLOW_ENCODER_RATE seconds (tests.throttle.encoders.RateEncoder). Exit status and
output are those of the command.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "askdrchaffee.settings")


def main():
    import django

    django.setup()
    from django.core.management import call_command
    from django.core.management.base import CommandError

    from segments.switch.backfill import pipeline
    from tests.embeddings.encoders import RecordingEncoder
    from tests.throttle.encoders import RateEncoder

    if os.environ.get("FAKE_BACKFILL_WRITE_AHEAD"):
        pipeline.AHEAD_ROUND_TRIP_SECONDS = 0.0

    rate, delay = os.environ.get("SLOW_ENCODER_RATE"), float(os.environ.get("FAKE_ENCODER_DELAY", "0"))
    encoder = RateEncoder(float(rate)) if rate else RecordingEncoder(delay=delay)
    try:
        call_command("backfill_embeddings", *sys.argv[1:], encoder=encoder)
    except CommandError as exc:
        sys.stderr.write(f"CommandError: {exc}\n")
        sys.exit(exc.returncode)


if __name__ == "__main__":
    main()
