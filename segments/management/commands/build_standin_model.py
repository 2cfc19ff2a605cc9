from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from embeddings import standins


class Command(BaseCommand):
    help = ("Write a stand-in embedding model, built offline from the packaged all-MiniLM-L6-v2 "
            "(embeddings/standins.py), for trying the old search where its real model cannot run: "
            "--dimensions N projects MiniLM to N dims (1536 for the original project's GTE-Qwen2-1.5B); "
            "--pooling cls gives another 384-dim model.")

    def add_arguments(self, parser):
        parser.add_argument("out", metavar="OUT", help="The directory to write (must not exist, or be empty).")
        kind = parser.add_mutually_exclusive_group(required=True)
        kind.add_argument("--dimensions", type=int, help="Project MiniLM's vectors to this many dimensions.")
        kind.add_argument("--pooling", choices=["cls"], help="MiniLM with CLS pooling: another 384-dim model.")
        parser.add_argument("--seed", type=int, default=0,
                            help="The projection's random seed (default 0): the same seed, the same model.")

    def handle(self, *args, out, dimensions, pooling, seed, **options):
        path = Path(out).expanduser().resolve()
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise CommandError(f"{path} exists and is not an empty directory: choose a new one.")
        if dimensions is not None and dimensions < 1:
            raise CommandError("--dimensions must be at least 1.")
        try:
            written = standins.projected(path, dimensions, seed) if pooling is None else standins.other_pooling(path)
        except ImportError as exc:
            raise CommandError(f"The packaged MiniLM is not installed ({exc}): pip install -r requirements.txt.") from None
        what = (standins.STANDINS["projected"].format(dimensions=dimensions, seed=seed) if pooling is None
                else standins.STANDINS["cls"])
        self.stdout.write(self.style.SUCCESS(f"Wrote {what} to {written}."))
        self.stdout.write(f"Fill the demo's old column with it: `manage.py load_demo_segments --legacy-model {written}`, "
                          f"and search that column with it: LEGACY_EMBEDDING_MODEL={written}")
