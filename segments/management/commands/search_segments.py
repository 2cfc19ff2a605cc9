import json

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError

from segments.schema import SchemaNotReady
from segments.search import MAX_K, SearchError, format_timestamp, search

EXCERPT_CHARS = 100


class Command(BaseCommand):
    help = "Print the segments nearest in meaning to a query, best first, with their cosine distances."

    # Tests hand the command an encoder or a reranker instead of the configured models.
    stealth_options = ("encoder", "reranker")

    def add_arguments(self, parser):
        parser.add_argument("query", help="What to search for, in plain words.")
        parser.add_argument("--k", type=int, default=None,
                            help="How many results (default 10, or RETURN_TOP_K with --rerank).")
        parser.add_argument("--rerank", action="store_true",
                            help="Re-score the nearest RERANK_TOP_K candidates with the reranker (RERANKER_MODEL).")
        parser.add_argument("--video", dest="video_id", help="Only segments of this video id.")
        parser.add_argument("--speaker", help="Only segments of this speaker label.")
        parser.add_argument("--video-type", help="Only segments of this video type.")
        parser.add_argument("--ef-search", type=int, default=None,
                            help=f"hnsw.ef_search for this search (default HNSW_EF_SEARCH; at most {MAX_K}).")
        parser.add_argument("--column", help="Vector column to search (default: the new model's column at this phase).")
        parser.add_argument("--database", default="default", help="Database alias (default 'default').")
        parser.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")

    def handle(self, *args, **options):
        k = options["k"]
        if k is None:
            k = settings.RETURN_TOP_K if options["rerank"] else 10
        try:
            results = search(
                options["query"], k=k, video_id=options["video_id"], speaker=options["speaker"],
                video_type=options["video_type"], rerank=options["rerank"], ef_search=options["ef_search"],
                encoder=options.get("encoder"), reranker=options.get("reranker"), column=options["column"],
                using=options["database"],
            )
        except (SearchError, SchemaNotReady, ImproperlyConfigured) as exc:
            raise CommandError(str(exc)) from None
        if options["json"]:
            self.stdout.write(_json_dumps(results))
        else:
            self._write_table(results)

    def _write_table(self, results):
        for note in results.notes:
            self.stderr.write(self.style.WARNING(note))
        reranked = f", reranked by {results.reranker_model}" if results.reranked else ""
        self.stdout.write(self.style.MIGRATE_HEADING(
            f"{len(results)} result(s) for {results.query!r} from segments.{results.column} "
            f"(phase {results.phase}, ef_search {results.ef_search}{reranked})"
        ))
        for rank, hit in enumerate(results, 1):
            segment = hit.segment
            score = f"  score {hit.rerank_score:.4f}" if hit.rerank_score is not None else ""
            self.stdout.write(
                f"{rank:>3}. distance {hit.distance:.4f}{score}  video {segment.video_id} "
                f"{format_timestamp(segment.start_sec)}-{format_timestamp(segment.end_sec)}  "
                f"speaker {segment.speaker_label or '-'}"
            )
            self.stdout.write(f"     {_excerpt(segment.text)}")


def _excerpt(text):
    text = " ".join(text.split())
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1] + "…"


def _json_dumps(results):
    return json.dumps({
        "query": results.query,
        "column": results.column,
        "phase": results.phase,
        "ef_search": results.ef_search,
        "reranked": results.reranked,
        "reranker_model": results.reranker_model,
        "notes": results.notes,
        "results": [
            {
                "rank": rank,
                "id": hit.segment.pk,
                "video_id": hit.segment.video_id,
                "start_sec": hit.segment.start_sec,
                "end_sec": hit.segment.end_sec,
                "speaker": hit.segment.speaker_label,
                "video_type": hit.segment.video_type,
                "distance": hit.distance,
                "rerank_score": hit.rerank_score,
                "text": hit.segment.text,
            }
            for rank, hit in enumerate(results, 1)
        ],
    })
