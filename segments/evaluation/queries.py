"""The questions the evaluation asks both searches, from free to best, and what answers each.

- known-item: a sentence of a sampled segment (5 to 60 words, drawn with the seed); its answer is that
  segment, or the same moment: a segment of the same video within `window` seconds of it. Free, and
  always there; it measures whether a model finds what was said, not whether it understands a question.
- labelled: a file of questions with the moments that answer them (`read_labelled`):

      question,answers
      Does red meat raise LDL cholesterol?,dQw4w9WgXcQ@754 1234
      how long does keto adaptation take,https://www.youtube.com/watch?v=dQw4w9WgXcQ&t=95s

  each answer a segment id, VIDEO@SECONDS (or VIDEO@h:mm:ss), or a YouTube link with its time; or a
  JSON list of {"question": ..., "answers": [...]}. A result answers when it is one of the ids, or a
  segment of that video within `window` seconds of that time.
- logged: the questions users asked, where the deployment keeps them (the original project logs each
  in `rag_requests.query_text`): replayed through both searches for how much they agree; those the
  labelled file also answers are judged with it.

Each query carries its slices (video type, speaker, text length) from the segment that answers it.
"""
import csv
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlparse

MIN_WORDS, MAX_WORDS = 5, 60
SENTENCE_END = re.compile(r"(?<=[.?!…])\s+")
LENGTHS = ((20, "short (up to 20 words)"), (60, "medium (21-60 words)"), (None, "long (over 60 words)"))
LOGGED_TABLE, LOGGED_COLUMN = "rag_requests", "query_text"
KNOWN_ITEM, LABELLED, LOGGED = "known-item", "labelled", "logged"


class LabelledFileError(ValueError):
    """The labelled file cannot be read; the message shows the format."""


@dataclass(frozen=True)
class Answers:
    ids: frozenset = frozenset()
    moments: tuple = ()  # (video_id, from_sec, to_sec): a segment of that video overlapping it, widened by the window

    def answered_by(self, hit, window):
        """Whether a result (id, video_id, start_sec, end_sec, ...) answers."""
        pk, video, start, end = hit[:4]
        return pk in self.ids or any(video == v and start <= until + window and end >= since - window
                                     for v, since, until in self.moments)


@dataclass
class Query:
    text: str
    kind: str
    answers: Answers | None  # None: nobody said what answers it (a logged question)
    slices: dict = field(default_factory=dict)


def length_slice(text):
    words = len(text.split())
    return next(name for limit, name in LENGTHS if limit is None or words <= limit)


def slices_of(row):
    """{"video type", "speaker", "length"} of a SegmentRow."""
    return {"video type": row.video_type or "unknown", "speaker": row.speaker or "unknown",
            "length": length_slice(row.text)}


def sentence_of(row, seed):
    """A sentence of the segment's text to search for (None when it has none of MIN_WORDS..MAX_WORDS words)."""
    parts = [part.strip() for part in SENTENCE_END.split(row.text.strip())]
    fitting = [part for part in parts if MIN_WORDS <= len(part.split()) <= MAX_WORDS]
    return random.Random(f"{seed}:{row.id}").choice(fitting) if fitting else None


def known_items(rows, seed):
    """A known-item Query for each SegmentRow that has a sentence to search for."""
    queries = []
    for row in rows:
        sentence = sentence_of(row, seed)
        if sentence is not None:
            answers = Answers(frozenset([row.id]), ((row.video_id, row.start_sec, row.end_sec),))
            queries.append(Query(sentence, KNOWN_ITEM, answers, slices_of(row)))
    return queries


# --- the labelled file ---------------------------------------------------------------------------

FORMAT = ('Give a CSV file with the columns question,answers (answers separated by spaces: segment ids, '
          'VIDEO@SECONDS, VIDEO@h:mm:ss or YouTube links with a time), or a JSON list of '
          '{"question": "...", "answers": [...]}.')


def seconds(text):
    """Seconds from "754", "754.5", "12:34", "1:02:03" or "95s"/"1m35s" (a YouTube t=)."""
    text = text.strip()
    found = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)", text)
    if found and any(found.groups()):
        hours, minutes, secs = (float(part) if part else 0.0 for part in found.groups())
        return hours * 3600 + minutes * 60 + secs
    parts = text.split(":")
    if not 1 <= len(parts) <= 3:
        raise ValueError(text)
    total = 0.0
    for part in parts:
        total = total * 60 + float(part)
    return total


def answer(item):
    """("id", int) or ("moment", (video_id, seconds)) from one answer as written."""
    if isinstance(item, int) or (isinstance(item, str) and item.strip().isdigit()):
        return "id", int(item)
    if isinstance(item, dict):
        return "moment", (str(item["video"]), float(seconds(str(item["at"]))))
    item = str(item).strip()
    if item.startswith(("http://", "https://")):
        return "moment", _youtube(item)
    video, _, at = item.rpartition("@")
    if not video or not at:
        raise ValueError(item)
    return "moment", (video, seconds(at))


def _youtube(link):
    url = urlparse(link)
    query = parse_qs(url.query)
    video = query["v"][0] if "v" in query else url.path.strip("/").split("/")[-1]
    return video, seconds(query.get("t", ["0"])[0])


def _answers(items):
    ids, moments = set(), []
    for kind, value in map(answer, items):
        if kind == "id":
            ids.add(value)
        else:
            moments.append((value[0], value[1], value[1]))
    return Answers(frozenset(ids), tuple(moments))


def _items(path):
    if path.suffix.lower() == ".json":
        return [(str(entry.get("question") or entry.get("query")), entry.get("answers") or entry.get("expected"))
                for entry in json.loads(path.read_text(encoding="utf-8"))]
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not {"question", "answers"} <= set(reader.fieldnames or ()):
            raise ValueError(f"its first line names the columns {', '.join(reader.fieldnames or ()) or 'nothing'}")
        return [(row["question"], (row["answers"] or "").replace(";", " ").replace(",", " ").split()) for row in reader]


def read_labelled(path):
    """[Query] of the labelled file at `path` (module docstring); LabelledFileError naming the problem."""
    path = Path(path)
    try:
        items = _items(path)
        queries = []
        for number, (question, given) in enumerate(items, 1):
            if not question or not question.strip() or question == "None" or not given:
                raise ValueError(f"entry {number} needs a question and at least one answer")
            queries.append(Query(question.strip(), LABELLED, _answers(given if isinstance(given, list) else [given])))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise LabelledFileError(f"Cannot read labelled questions from {path} ({exc}). {FORMAT}") from None
    if not queries:
        raise LabelledFileError(f"{path} holds no labelled question. {FORMAT}")
    return queries


def resolve(cursor, queries, window):
    """Give each labelled Query the slices of the segment that answers it; LabelledFileError for an answer
    that matches no segment (a typo in an id or a video)."""
    for query in queries:
        row = _answering_row(cursor, query.answers, window)
        if row is None:
            raise LabelledFileError(f"No segment answers {query.text!r} as labelled ({_shown(query.answers)}): "
                                    "check the ids, videos and times.")
        query.slices = slices_of(row)


def _answering_row(cursor, answers, window):
    from segments.evaluation.table import SegmentRow

    columns = "id, video_id, start_sec, end_sec, text, speaker_label, video_type"
    if answers.ids:
        cursor.execute(f"SELECT {columns} FROM segments WHERE id = ANY(%s) ORDER BY id LIMIT 1", [list(answers.ids)])
        found = cursor.fetchone()
        if found:
            return SegmentRow(*found)
    for video, at, _ in answers.moments:
        cursor.execute(f"SELECT {columns} FROM segments WHERE video_id = %s AND start_sec <= %s AND end_sec >= %s "
                       "ORDER BY abs(start_sec - %s) LIMIT 1", [video, at + window, at - window, at])
        found = cursor.fetchone()
        if found:
            return SegmentRow(*found)
    return None


def _shown(answers):
    return ", ".join([str(pk) for pk in sorted(answers.ids)] + [f"{v}@{at:g}" for v, at, _ in answers.moments])


# --- the questions users asked -------------------------------------------------------------------

def logged(cursor, limit):
    """The `limit` most recent distinct questions of the deployment's log (None when it keeps none)."""
    cursor.execute("SELECT column_name FROM information_schema.columns WHERE table_name = %s "
                   "AND table_schema = ANY(current_schemas(false))", [LOGGED_TABLE])
    columns = {name for (name,) in cursor.fetchall()}
    if LOGGED_COLUMN not in columns or limit <= 0:
        return None
    recent = "max(created_at) DESC NULLS LAST, " if "created_at" in columns else ""
    cursor.execute(f"SELECT {LOGGED_COLUMN} FROM {LOGGED_TABLE} WHERE {LOGGED_COLUMN} ~ '[[:alnum:]]' "
                   f"GROUP BY {LOGGED_COLUMN} ORDER BY {recent}{LOGGED_COLUMN} LIMIT %s", [limit])
    return [Query(text.strip(), LOGGED, None) for (text,) in cursor.fetchall()]


def judged_subset(logged_queries, labelled):
    """The logged questions the labelled file answers, with its answers and slices."""
    by_text = {_normal(query.text): query for query in labelled}
    return [Query(q.text, LOGGED, by_text[_normal(q.text)].answers, by_text[_normal(q.text)].slices)
            for q in logged_queries if _normal(q.text) in by_text]


def _normal(text):
    return " ".join(text.lower().split())
