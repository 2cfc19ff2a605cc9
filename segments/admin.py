"""The Segment admin: browse the transcript segments and search them by meaning.

The search box runs the same semantic search as `manage.py search_segments` (segments.search):
the query is embedded and the nearest segments are listed in similarity order with their cosine
distance (and the reranker's score when ENABLE_RERANKER is on), over as many pages as needed.
The query reaches the database only as a vector parameter, never as SQL text. Each row's time
links to that moment of the video on YouTube.

Until the new embeddings are live (before the swap), and whenever the embedding model cannot be
loaded, the box falls back to Django's plain text search (`text` contains the words) and a
message says why and what to do. Vectors are never loaded into the list or the form.

The "Embedding switch" page (EmbeddingSwitchAdmin) shows segments.switch.status as a panel:
phase, progress, counts, workers, index build, swap readiness and the next command. Its
"Compare searches" page (segments/compare_admin.py) asks the old and the new search one question.
"""

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.views.main import ORDER_VAR, SEARCH_VAR
from django.core.exceptions import ImproperlyConfigured, PermissionDenied
from django.db import connection
from django.db.models import BooleanField, Case, CharField, Exists, FloatField, IntegerField, OuterRef, Value, When
from django.db.models.expressions import RawSQL
from django.template.response import TemplateResponse
from django.urls import path
from django.utils.html import format_html

from segments.compare_admin import compare_view
from segments.evaluation import chart as evaluation_chart
from segments.models import EmbeddingSwitch, QuarantinedSegment, Segment, SwitchEvent
from segments.schema import BLANK_TEXT_PATTERN, LIVE, TABLE, SchemaNotReady, embedding_schema
from segments.search import SearchError, format_timestamp, search, youtube_url
from segments.switch import status as switch_status
from segments.switch.admin import ReadOnlyAdmin

EMBEDDED, PENDING, BLANK, QUARANTINED = "embedded", "pending", "blank", "quarantined"
NO_COLUMN = "no new column yet"
EXCERPT_CHARS = 400


def _written_here(column):
    """Whether the model ledger records vectors this project wrote (or adopted) in segments.`column`,
    which the search can then embed questions for; not the original project's declared model."""
    from embeddings import ledger

    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass('embeddings_vector_column') IS NOT NULL")
        recorded = ledger.entry(cursor, TABLE, column) if cursor.fetchone()[0] else None
    return recorded is not None and recorded.source not in ("declared", "simulated")


def embedding_status_expression(schema):
    """An expression giving each segment's embedding status at the table's phase."""
    if schema.vector_column is None:
        return Value(NO_COLUMN, output_field=CharField())
    quote = connection.ops.quote_name
    has_vector = RawSQL(f"{quote(TABLE)}.{quote(schema.vector_column)} IS NOT NULL", [],
                        output_field=BooleanField())
    quarantined = Exists(QuarantinedSegment.objects.filter(segment_id=OuterRef("pk")))
    return Case(
        When(has_vector, then=Value(EMBEDDED)),
        When(text__regex=BLANK_TEXT_PATTERN, then=Value(BLANK)),
        When(quarantined, then=Value(QUARANTINED)),
        default=Value(PENDING),
        output_field=CharField(),
    )


def _by_position(sql_type, values, ids):
    """values[i] for the row whose id is ids[i] (both passed as query parameters)."""
    row_id = f"{connection.ops.quote_name(TABLE)}.{connection.ops.quote_name('id')}"
    output = IntegerField() if sql_type == "integer" else FloatField()
    if values is None:
        return RawSQL(f"array_position(%s::integer[], {row_id})", [ids], output_field=output)
    return RawSQL(f"(%s::{sql_type}[])[array_position(%s::integer[], {row_id})]", [values, ids],
                  output_field=output)


class EmbeddingStatusFilter(admin.SimpleListFilter):
    title = "embedding status"
    parameter_name = "embedding_status"

    def lookups(self, request, model_admin):
        return [(status, status) for status in (EMBEDDED, PENDING, BLANK, QUARANTINED)]

    def queryset(self, request, queryset):
        if self.value():
            return queryset.filter(embedding_status=self.value())
        return queryset


@admin.register(Segment)
class SegmentAdmin(admin.ModelAdmin):
    list_display = ["id", "video_id", "timestamps", "speaker_label", "video_type", "excerpt", "embedding_status"]
    list_filter = ["video_id", "speaker_label", "video_type", EmbeddingStatusFilter]
    search_fields = ["text"]
    search_help_text = "Searches by meaning: the closest segments first, with their cosine distance."
    readonly_fields = ["created_at", "embedding_status"]
    list_per_page = 50
    # How many segments a semantic search lists (when reranking: RETURN_TOP_K).
    semantic_results = 100

    def get_queryset(self, request):
        queryset = super().get_queryset(request).defer("embedding")
        return queryset.annotate(embedding_status=embedding_status_expression(self._schema(request)))

    def get_list_display(self, request):
        columns = list(super().get_list_display(request))
        if request.GET.get(SEARCH_VAR, "").strip():
            columns.insert(1, "distance")
            if settings.ENABLE_RERANKER:
                columns.insert(2, "rerank_score")
        return columns

    def get_search_results(self, request, queryset, search_term):
        if not search_term.strip():
            return super().get_search_results(request, queryset, search_term)
        results = self._semantic_search(request, search_term)
        if results is None:
            return super().get_search_results(request, queryset, search_term)
        ids = [hit.segment.pk for hit in results]
        queryset = queryset.filter(pk__in=ids).annotate(
            semantic_rank=_by_position("integer", None, ids),
            semantic_distance=_by_position("double precision", [hit.distance for hit in results], ids),
            semantic_score=_by_position("double precision", [hit.rerank_score for hit in results], ids),
        )
        if ORDER_VAR not in request.GET:  # a column the user clicked wins; otherwise similarity order
            queryset = queryset.order_by("semantic_rank")
        return queryset, False

    def _schema(self, request):
        if not hasattr(request, "_segments_schema"):
            request._segments_schema = embedding_schema()
        return request._segments_schema

    def _semantic_search(self, request, term):
        """SearchResults for `term`, or None (with a message saying why) for the text fallback.

        Run once per request: the changelist may ask again for its filters' facet counts.
        """
        cache = request.__dict__.setdefault("_segments_semantic_search", {})
        if term not in cache:
            cache[term] = self._run_search(request, term)
        return cache[term]

    def _run_search(self, request, term):
        schema = self._schema(request)
        if not schema.is_live and not _written_here(LIVE):
            self.message_user(request, (
                f"The new embeddings are not live yet (phase: {schema.phase}), so this is a plain text "
                "search: segments whose text contains the words. Semantic search starts after the swap: "
                "`manage.py verify_embeddings`, then `manage.py embedding_switch swap`."
            ), messages.WARNING)
            return None
        rerank = settings.ENABLE_RERANKER
        try:
            results = search(term, k=settings.RETURN_TOP_K if rerank else self.semantic_results, rerank=rerank,
                             column=LIVE)
        except (ImproperlyConfigured, SchemaNotReady, SearchError) as exc:
            self.message_user(request, (
                f"Semantic search is unavailable, so this is a plain text search: {exc}"
            ), messages.WARNING)
            return None
        for note in results.notes:
            self.message_user(request, note, messages.WARNING)
        return results

    @admin.display(description="distance")
    def distance(self, obj):
        value = getattr(obj, "semantic_distance", None)
        return None if value is None else f"{value:.4f}"

    @admin.display(description="reranker score")
    def rerank_score(self, obj):
        value = getattr(obj, "semantic_score", None)
        return None if value is None else f"{value:.4f}"

    @admin.display(description="time", ordering="start_sec")
    def timestamps(self, obj):
        return format_html(
            '<a href="{}" target="_blank" rel="noopener" title="Watch this moment on YouTube">{}–{}</a>',
            youtube_url(obj.video_id, obj.start_sec), format_timestamp(obj.start_sec), format_timestamp(obj.end_sec))

    @admin.display(description="text")
    def excerpt(self, obj):
        text = " ".join(obj.text.split())
        return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1] + "…"

    @admin.display(description="embedding", ordering="embedding_status")
    def embedding_status(self, obj):
        return getattr(obj, "embedding_status", None)

STEP_LABELS = {"expand": "Expand", "backfill": "Backfill", "index": "Index", "swap": "Verify & swap",
               "contract": "Contract"}
REFRESH_SECONDS = 10  # the page reloads itself this often while a backfill or an index build runs


def _number(value):
    return "–" if value is None else f"{value:,}"


def _detail(value):
    return _number(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _rate(value):
    return "–" if value is None else f"{value:,.1f}"


def _percent(part, whole):
    return None if not whole or part is None else 100.0 * part / whole


def switch_panel(status):
    """What the "Embedding switch" page shows, formatted (segments.switch.status.collect's dict)."""
    rows, backfill, build = status["rows"], status["backfill"], status["index_build"]
    percent = _percent(rows["embedded"], rows["with_text"])
    build_percent = None if build is None else build["percent_blocks"] or build["percent_tuples"]
    size = status["size"]
    return {
        "steps": [{**step, "label": STEP_LABELS[step["step"]]} for step in status["steps"]],
        "percent": None if percent is None else f"{min(percent, 100.0):.1f}",
        "embedded": _number(rows["embedded"]), "with_text": _number(rows["with_text"]),
        "counts": [(label, _number(rows[key]), key) for key, label in (
            ("total", "total"), ("with_text", "with text"), ("embedded", "embedded"), ("pending", "pending"),
            ("quarantined", "quarantined"), ("blank", "blank"))],
        "workers": [{**worker, "rows_done": f"{worker['rows_done']:,}",
                     "rate": _rate(worker.get("recent_rows_per_s") or worker["rows_per_s"]),
                     "last_batch": "none yet" if worker.get("seconds_since_last_batch") is None else
                     switch_status.human_duration(worker["seconds_since_last_batch"]) + " ago"}
                    for worker in backfill["workers"]],
        "columns": [{**column, "role": role, "model": status["models"].get(column["name"])}
                    for role, column in (("new", status["columns"]["vector"]), ("legacy", status["columns"]["legacy"]))
                    if column],
        "waiting": [(column, {"shown": "none" if age is None else switch_status.human_duration(age),
                              "late": age is not None and age > settings.PENDING_WARNING_SECONDS})
                    for column, age in status["pending_age"].items()],
        "rate": None if backfill["rows_per_s"] is None else f"{backfill['rows_per_s']:,.1f}",
        "eta": switch_status.human_duration(backfill["eta_seconds"]),
        "build_percent": None if build_percent is None else f"{build_percent:.1f}",
        "tuples": None if build is None or not build["tuples_total"] else
        f"{_number(build['tuples_done'])} of {_number(build['tuples_total'])} tuples",
        "sizes": [(label, switch_status.human_bytes(size[key])) for key, label in (
            ("now_bytes", "now"), ("before_bytes", "before the switch"), ("after_contract_bytes", "after the contract"))
            if size[key] is not None],
        "refresh": REFRESH_SECONDS if backfill["running"] or build is not None else None,
        # red only when the swap is the step at hand and it would be refused
        "swap_tone": "ok" if status["swap"]["done"] or status["swap"]["accepted"] else
        "bad" if any(step["step"] == "swap" and step["state"] == "current" for step in status["steps"]) else "",
        "evaluation": evaluation_chart.panel(status.get("evaluation"), settings.EMBEDDING_EVAL_TOLERANCE),
    }


@admin.register(EmbeddingSwitch)
class EmbeddingSwitchAdmin(ReadOnlyAdmin):
    """The "Embedding switch" page: where the switch stands (segments.switch.status), and its events.

    Read-only; for staff with the view permission of "embedding switch" (superusers have it).
    """

    events_shown = 20

    def get_urls(self):
        info = self.opts.app_label, self.opts.model_name
        return [path("compare/", self.admin_site.admin_view(self.compare_view), name="%s_%s_compare" % info),
                path("", self.admin_site.admin_view(self.changelist_view), name="%s_%s_changelist" % info)]

    def compare_view(self, request):
        """The "Compare searches" page: the old and the new search side by side (same permission)."""
        return compare_view(self, request)

    def changelist_view(self, request, extra_context=None):
        if not self.has_view_permission(request):
            raise PermissionDenied
        status = switch_status.collect()
        context = {
            **self.admin_site.each_context(request),
            "title": "Embedding switch", "opts": self.opts, "status": status, "panel": switch_panel(status),
            "events": self._events(),
            **(extra_context or {}),
        }
        return TemplateResponse(request, "admin/segments/embedding_switch.html", context)

    def _events(self):
        """The latest steps of the switch, newest first (none before migration 0002 made their table)."""
        if SwitchEvent._meta.db_table not in connection.introspection.table_names():
            return []
        events = list(SwitchEvent.objects.order_by("-at", "-id")[: self.events_shown])
        for event in events:
            event.summary = " · ".join(f"{key}: {_detail(value)}" for key, value in (event.details or {}).items()
                                       if not isinstance(value, dict))  # an evaluation's figures: its own card
        return events


