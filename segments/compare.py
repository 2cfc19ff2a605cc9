"""The old search and the new one, side by side: one question, each model's answer, and how much
they agree. For the admin's "Compare searches" page and `manage.py compare_search`.

    comparison = compare("Does red meat raise LDL cholesterol?", k=10)
    comparison.old.results, comparison.new.results   # SearchResults, or None with .problem/.fix
    comparison.overlap, comparison.rbo                # shared segments in the top k, rank-biased overlap

Which columns are compared depends on the phase of the table (segments/schema.py):

    expanded   old: embedding (the live, replaced model)   new: the next model's column
    swapped    old: embedding_legacy                       new: embedding (live)
    legacy, final: one model's vectors only: nothing to compare (`Comparison.problem` says so)

Each side is an ordinary `segments.search.search` of its column, so each question is embedded
by the model the model ledger records for that column (`reader_for`): EMBEDDING_MODEL for the
new model's column, LEGACY_EMBEDDING_MODEL for the replaced model's. A side that cannot run (its
model is not configured, cannot be loaded, or the column holds simulated vectors) gets a reason
and what to change instead of results; the other side still runs.

The agreement of the two top-k lists is given twice:

- `overlap`: how many segments both lists hold (order ignored), out of k;
- `rbo`: rank-biased overlap (Webber, Moffat and Zobel, "A similarity measure for indefinite
  rankings", ACM TOIS 28(4), 2010), extrapolated (RBO_ext, their equation 32) with persistence
  p = 0.9: the agreement at each depth d (the share of the top d both lists hold), weighted by
  p^(d-1), so the first ranks count most (with p = 0.9 the top 10 carry about 86% of the weight).
  1 for identical lists, 0 for disjoint ones.

Two models rank differently: a low overlap is a difference to look at, not a failure by itself.
"""
import logging
from dataclasses import dataclass, field

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from embeddings.encoder import ModelUnavailable
from segments.schema import TABLE, embedding_schema
from segments.search import MAX_K, SearchError, search

logger = logging.getLogger(__name__)

P = 0.9  # RBO's persistence: the weight of the ranks after the first d is p^d
OLD, NEW = "old", "new"


def rbo(first, second, p=P):
    """Rank-biased overlap, extrapolated (RBO_ext), of two rankings of distinct items.

    The lists may differ in length; each is taken to go on beyond its end as it began (the
    agreement seen at its last rank continues). 1.0 for identical lists (or one a prefix of the
    other), 0.0 for lists without a common item; None when both are empty.
    """
    if not 0 < p < 1:
        raise ValueError(f"p={p}: RBO's persistence is between 0 and 1 (exclusive).")
    short, long = (list(first), list(second)) if len(first) <= len(second) else (list(second), list(first))
    s, l = len(short), len(long)
    if l == 0:
        return None
    if s == 0:
        return 0.0
    seen_short, seen_long = set(), set()
    overlap = 0  # X_d: items in both prefixes of depth d (the short list whole once d > s)
    weighted = 0.0  # sum over d <= l of X_d / d * p^d
    extrapolated = 0.0  # sum over s < d <= l of X_s * (d - s) / (s * d) * p^d
    overlap_at_s = 0
    for d in range(1, l + 1):
        item = long[d - 1]
        if d <= s:
            mine = short[d - 1]
            overlap += 1 if mine == item else (mine in seen_long) + (item in seen_short)
            seen_short.add(mine)
        else:
            overlap += item in seen_short
        seen_long.add(item)
        if d == s:
            overlap_at_s = overlap
        weighted += overlap / d * p**d
        if d > s:
            extrapolated += overlap_at_s * (d - s) / (s * d) * p**d
    tail = ((overlap - overlap_at_s) / l + overlap_at_s / s) * p**l
    return (1 - p) / p * (weighted + extrapolated) + tail


@dataclass
class Side:
    """One column's search: its results, or why it could not run (`problem`) and what would fix it."""

    label: str  # "old" or "new"
    column: str
    setting: str  # the setting naming the model that embeds its questions
    recorded: object = None  # the model ledger's Entry for the column (None when none is recorded)
    results: object = None  # SearchResults
    problem: str | None = None
    fix: str | None = None

    @property
    def ok(self):
        return self.results is not None

    @property
    def model(self):
        """The model the column holds, as the ledger records it (for people)."""
        if self.recorded is None:
            return "no model recorded"
        return f"{self.recorded.identity} ({self.recorded.source})"

    @property
    def model_name(self):
        return None if self.recorded is None else self.recorded.identity.name

    @property
    def ids(self):
        return [] if self.results is None else [hit.segment.pk for hit in self.results]


@dataclass
class Comparison:
    question: str
    k: int
    phase: str
    old: Side | None = None
    new: Side | None = None
    problem: str | None = None  # set when there is nothing to compare at this phase
    p: float = P
    shared: set = field(default_factory=set)  # segment ids in both top-k lists
    overlap: int | None = None
    rbo: float | None = None

    @property
    def sides(self):
        return [side for side in (self.old, self.new) if side is not None]

    @property
    def complete(self):
        """Both sides ran: the overlap figures mean something."""
        return self.problem is None and all(side.ok for side in self.sides) and len(self.sides) == 2


def plan(using="default"):
    """(phase, old Side, new Side) without results, or (phase, None, None) when the table holds one
    model's vectors only. SchemaNotReady without the table."""
    schema = embedding_schema(using)
    if schema.compared is None:
        return schema.phase, None, None
    old, new = schema.compared
    recorded = _recorded(using)
    return (schema.phase,
            Side(OLD, old, _setting(recorded.get(old)), recorded.get(old)),
            Side(NEW, new, _setting(recorded.get(new)), recorded.get(new)))


def nothing_to_compare(phase):
    if phase == "final":
        return ("Nothing to compare: the switch is complete (phase final), so segments.embedding holds one "
                "model's vectors only; the replaced model's column was dropped by the contract. The comparison "
                "runs from phase 1 (expand) until the contract.")
    return (f"Nothing to compare: segments holds one model's vectors only (phase {phase}). Start a switch "
            "with `manage.py migrate` (phase 1 adds the next model's column) and fill it with "
            "`manage.py backfill_embeddings`.")


def compare(question, k=10, using="default", p=P):
    """Run `question` against the old and the new model's column; a Comparison.

    SearchError for an empty question or k outside 1..1000; SchemaNotReady without the table.
    Whatever else keeps a side from running is that side's `problem`.
    """
    if not question or not question.strip():
        raise SearchError("The question is empty: give the words to search for.")
    if not 1 <= k <= MAX_K:
        raise SearchError(f"k={k}: ask for between 1 and {MAX_K} results.")
    phase, old, new = plan(using)
    comparison = Comparison(question, k, phase, old, new, p=p)
    if old is None:
        comparison.problem = nothing_to_compare(phase)
        return comparison
    for side in (new, old):
        _run(side, question, k, using)
    if comparison.complete:
        old_ids, new_ids = old.ids, new.ids
        comparison.shared = set(old_ids) & set(new_ids)
        comparison.overlap = len(comparison.shared)
        comparison.rbo = rbo(old_ids, new_ids, p)
    return comparison


def _recorded(using):
    from embeddings import ledger

    with connections[using].cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [ledger.LEDGER])
        return ledger.entries(cursor, TABLE) if cursor.fetchone()[0] else {}


def _setting(recorded):
    """The setting that names the model embedding questions for a column recorded as `recorded`
    (as segments.search.configured_model picks it)."""
    if recorded is not None and recorded.identity.name == settings.LEGACY_EMBEDDING_MODEL \
            and recorded.identity.name != settings.EMBEDDING_MODEL:
        return "LEGACY_EMBEDDING_MODEL"
    return "EMBEDDING_MODEL"


def _run(side, question, k, using):
    if side.recorded is not None and side.recorded.source == "simulated":
        side.problem = (f"segments.{side.column} holds simulated vectors ({side.recorded.identity.description or 'random'}): "
                        "no model wrote them, so no question can be embedded to search them.")
        side.fix = ("Load demo data whose old vectors a model wrote: `manage.py load_demo_segments --legacy-model PATH` "
                    "(`manage.py build_standin_model PATH --dimensions 1536` makes one), then set "
                    "LEGACY_EMBEDDING_MODEL=PATH.")
        return
    try:
        side.results = search(question, k=k, column=side.column, using=using)
    except ModelUnavailable as exc:
        side.problem = str(exc)
        side.fix = _fix_unavailable(side)
    except ImproperlyConfigured as exc:  # ModelMismatch, DimensionMismatch
        side.problem = str(exc)
        side.fix = _fix_mismatch(side)
    except SearchError as exc:
        side.problem = str(exc)
    except Exception as exc:  # a model that fails to load in another way: this side only, said as it is
        logger.exception("the %s search of segments.%s failed", side.label, side.column)
        side.problem = f"The search failed: {type(exc).__name__}: {exc}"
        side.fix = _which_model(side)


def _which_model(side):
    if side.recorded is None:
        return f"No model is recorded for segments.{side.column} in the model ledger."
    return f"The model ledger records {side.model} for segments.{side.column}."


def _fix_unavailable(side):
    if side.label == OLD:
        name = settings.LEGACY_EMBEDDING_MODEL
        return (f"The old search needs LEGACY_EMBEDDING_MODEL (now {name!r}) to name a model that can be loaded "
                f"here (a Hugging Face id in the cache or reachable, or a local directory) and whose vectors "
                f"segments.{side.column} holds. {_which_model(side)}")
    return (f"The new search needs {side.setting} (now {getattr(settings, side.setting)!r}) to name a model "
            "that can be loaded here. "
            f"{_which_model(side)}")


def _fix_mismatch(side):
    if side.label == OLD:
        return (f"Set LEGACY_EMBEDDING_MODEL (now {settings.LEGACY_EMBEDDING_MODEL!r}) to the model whose vectors "
                f"segments.{side.column} holds, as the ledger names it. {_which_model(side)}")
    return (f"Set EMBEDDING_MODEL (now {settings.EMBEDDING_MODEL!r}) to the model whose vectors "
            f"segments.{side.column} holds. {_which_model(side)}")
