"""`manage.py backfill_embeddings` with an encoder of a given speed, for the throttle's tests.

    SLOW_ENCODER_RATE=2000 python tests/throttle/slow_backfill.py [backfill_embeddings options]

The encoder is the HashingEncoder (vectors the tests can check) taking len(texts) / SLOW_ENCODER_RATE
seconds a call, as a device of that speed would (tests.throttle.encoders.RateEncoder). Exit status
and output are those of the command.
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

    from tests.throttle.encoders import RateEncoder

    encoder = RateEncoder(float(os.environ["SLOW_ENCODER_RATE"]))
    try:
        call_command("backfill_embeddings", *sys.argv[1:], encoder=encoder)
    except CommandError as exc:
        sys.stderr.write(f"CommandError: {exc}\n")
        sys.exit(exc.returncode)


if __name__ == "__main__":
    main()
