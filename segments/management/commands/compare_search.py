import json
import sys
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from segments.compare import P, compare
from segments.schema import SchemaNotReady
from segments.search import MAX_K, SearchError


def read_questions(source):
    """The questions of `source` (a path, or "-" for stdin): one a line; blank lines and lines starting
    with # are skipped."""
    if source == "-":
        text = sys.stdin.read()
    else:
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"Cannot read {source}: {exc.strerror or exc}.") from None
        except UnicodeDecodeError:
            raise CommandError(f"{source} is not UTF-8 text.") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _mean(values):
    values = [value for value in values if value is not None]
    return sum(values) / len(values) if values else None


class Command(BaseCommand):
    help = ("Ask the old and the new model's search the same questions and print how much their top k agree: "
            "shared segments (overlap@k) and rank-biased overlap (RBO, p=0.9), per question and on average. "
            "Runs between phase 1 and the contract (segments/compare.py).")

    def add_arguments(self, parser):
        parser.add_argument("questions", metavar="QUESTIONS_FILE",
                            help="One question a line (blank lines and # comments skipped); - reads stdin.")
        parser.add_argument("--k", type=int, default=10, help="How many results each search lists (default 10).")
        parser.add_argument("--json", action="store_true", help="Print the figures and both rankings as JSON.")

    def handle(self, *args, questions, k, **options):
        as_json = options["json"]
        if not 1 <= k <= MAX_K:
            raise CommandError(f"--k {k}: choose between 1 and {MAX_K}.")
        asked = read_questions(questions)
        if not asked:
            raise CommandError(f"{questions} holds no question (blank lines and # comments are skipped).")
        comparisons = []
        for question in asked:
            try:
                comparison = compare(question, k=k)
            except (SchemaNotReady, SearchError) as exc:
                raise CommandError(str(exc)) from None
            _require_both(comparison)
            comparisons.append(comparison)
            if not as_json:
                self._line(comparison, first=len(comparisons) == 1)
        mean_overlap = _mean([c.overlap for c in comparisons])
        mean_rbo = _mean([c.rbo for c in comparisons])
        if as_json:
            self.stdout.write(json.dumps(_report(comparisons, k, mean_overlap, mean_rbo), indent=2))
        else:
            self.stdout.write(f"{'mean':>9}  {f'{mean_overlap:.1f}/{k}':>8}  {_rbo(mean_rbo)}  over {len(comparisons)} "
                              f"question(s)")

    def _line(self, comparison, first):
        if first:
            old, new = comparison.old, comparison.new
            self.stdout.write(f"old: segments.{old.column}, {old.model}\nnew: segments.{new.column}, {new.model}\n"
                              f"top {comparison.k}, RBO with p={comparison.p}\n\n")
            self.stdout.write(f"{'':>9}  {'overlap':>8}  {'RBO':>5}  question")
        shared = f"{comparison.overlap}/{comparison.k}"
        self.stdout.write(f"{'':>9}  {shared:>8}  {_rbo(comparison.rbo)}  {comparison.question}")



def _rbo(value):
    return "    –" if value is None else f"{value:.3f}"


def _require_both(comparison):
    """CommandError saying why, unless both searches ran."""
    if comparison.problem:
        raise CommandError(comparison.problem)
    failed = [side for side in comparison.sides if not side.ok]
    if failed:
        raise CommandError("\n".join(
            f"The {side.label} search (segments.{side.column}) cannot run: {side.problem}"
            + (f"\n{side.fix}" if side.fix else "") for side in failed))


def _side(side):
    return {"column": side.column, "model": side.model_name, "source": side.recorded.source if side.recorded else None,
            "setting": side.setting}


def _report(comparisons, k, mean_overlap, mean_rbo):
    first = comparisons[0]
    return {
        "phase": first.phase, "k": k, "p": P, "old": _side(first.old), "new": _side(first.new),
        "questions": [{"question": c.question, "overlap": c.overlap, "rbo": c.rbo, "shared": sorted(c.shared),
                       "old": [{"id": hit.segment.pk, "distance": hit.distance} for hit in c.old.results],
                       "new": [{"id": hit.segment.pk, "distance": hit.distance} for hit in c.new.results]}
                      for c in comparisons],
        "mean_overlap": mean_overlap, "mean_rbo": mean_rbo,
    }
