"""The admin's "Compare searches" page: one question asked of the old and the new search, their
ranked lists next to each other, the segments both found marked, and their overlap (shared in the
top k, rank-biased overlap). segments.compare does the work; this module only presents it.

It hangs off the "Embedding switch" page (segments.admin.EmbeddingSwitchAdmin) and needs the same
permission. Whatever goes wrong becomes a message on the page, never an error page: a side that
cannot run says why and what to set, and the other side is still shown.
"""
import logging

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.template.response import TemplateResponse

from segments.compare import compare, nothing_to_compare, plan
from segments.schema import SchemaNotReady
from segments.search import SearchError, format_timestamp, youtube_url

logger = logging.getLogger(__name__)

TEMPLATE = "admin/segments/compare_searches.html"
DEFAULT_K = 10
MAX_K = 100  # a page is read by a person: more than this is for `manage.py compare_search`
EXCERPT_CHARS = 280


def excerpt(text, limit=EXCERPT_CHARS):
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _k(request):
    try:
        return min(max(int(request.GET.get("k", DEFAULT_K)), 1), MAX_K)
    except ValueError:
        return DEFAULT_K


def rows(side, other):
    """What the page lists for `side`'s hits: rank, distance, time and link, excerpt, and the rank of
    the same segment in the `other` side's list (None when only this side found it)."""

    other_rank = {pk: rank for rank, pk in enumerate(other.ids if other is not None else [], start=1)}
    listed = []
    for rank, hit in enumerate(side.results or [], start=1):
        segment = hit.segment
        listed.append({
            "rank": rank, "id": segment.pk, "distance": f"{hit.distance:.4f}",
            "url": youtube_url(segment.video_id, segment.start_sec), "video_id": segment.video_id,
            "time": f"{format_timestamp(segment.start_sec)}–{format_timestamp(segment.end_sec)}",
            "excerpt": excerpt(segment.text), "other_rank": other_rank.get(segment.pk),
        })
    return listed


def compare_view(model_admin, request):
    """The page, for `model_admin` (EmbeddingSwitchAdmin): who may see it is who may see that one."""
    if not model_admin.has_view_permission(request):
        raise PermissionDenied
    question, k = request.GET.get("q", "").strip(), _k(request)
    context = {
        **model_admin.admin_site.each_context(request),
        "title": "Compare searches", "opts": model_admin.opts, "question": question, "k": k,
        "phase": None, "sides": [], "comparison": None, "problem": None,
    }
    try:
        phase, old, new = plan()
        context["phase"] = phase
        if old is None:
            context["problem"] = nothing_to_compare(phase)
        elif question:
            comparison = compare(question, k=k)
            old, new = comparison.old, comparison.new
            context["comparison"] = comparison
        context["sides"] = [{"side": side, "title": f"{side.label.capitalize()} search", "rows": rows(side, other)}
                            for side, other in ((old, new), (new, old)) if side is not None]
    except (SchemaNotReady, SearchError) as exc:
        model_admin.message_user(request, str(exc), messages.WARNING)
    except Exception as exc:  # a page for people: say what failed instead of an error page
        logger.exception("compare searches failed for %r", question)
        model_admin.message_user(request, f"The comparison could not run: {type(exc).__name__}: {exc}",
                                 messages.ERROR)
    return TemplateResponse(request, TEMPLATE, context)
