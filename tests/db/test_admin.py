"""The Segment admin: semantic search in similarity order, statuses, filters, the fallbacks, the
links to YouTube, and the "Embedding switch" page."""
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from django.db import connection
from django.contrib import admin
from django.contrib.auth.models import Permission
from django.test import RequestFactory
from django.utils.html import escape

from segments.models import QuarantinedSegment
from segments.admin import SegmentAdmin
from segments.models import Segment
from segments.switch import status, swap
from tests.conftest import MINILM_PATH

CHANGELIST = "/admin/segments/segment/"
SWITCH_PAGE = "/admin/segments/embeddingswitch/"
TEXTS = [
    ("v1", "Chaffee", "interview", "Fasting lowers insulin within a day."),
    ("v1", "Chaffee", "interview", "Red meat is rich in protein and fat."),
    ("v2", "Guest", "podcast", "Plants produce toxins to deter animals."),
    ("v2", "Guest", "podcast", "Ketones fuel the brain during a fast."),
    ("v3", "Chaffee", "lecture", "The video was recorded in a studio."),
]
QUERY = "going without food"


def rebuild_vector_index():
    """Rebuild the HNSW graph from this test's rows only (see tests/db/test_search.py)."""
    with connection.cursor() as cursor:
        cursor.execute("REINDEX INDEX segments_embedding_hnsw")


@pytest.fixture
def embedded(db, minilm, use_minilm):
    """The five segments, embedded with the packaged MiniLM (the configured model for the admin)."""
    vectors = minilm.encode_documents([text for *_, text in TEXTS])
    segments = [Segment.objects.create(video_id=video, speaker_label=speaker, video_type=kind, start_sec=60 * i,
                                       end_sec=60 * i + 30, text=text, embedding=vector)
                for i, ((video, speaker, kind, text), vector) in enumerate(zip(TEXTS, vectors))]
    rebuild_vector_index()
    return segments


def expected_ranking(minilm, segments, query):
    """(ids, cosine distances) nearest first, computed here with numpy from the same model."""
    query_vector = minilm.encode_query(query)
    distances = {s.pk: 1 - float(np.dot(query_vector, minilm.encode_documents([s.text])[0])) for s in segments}
    ordered = sorted(distances, key=distances.get)
    return ordered, [distances[pk] for pk in ordered]


def listed(response):
    return list(response.context["cl"].result_list)


@pytest.fixture
def per_page():
    """Set the registered SegmentAdmin's page size for one test."""
    model_admin = admin.site._registry[Segment]
    original = model_admin.list_per_page
    yield lambda size: setattr(model_admin, "list_per_page", size)
    model_admin.list_per_page = original


# --- Who can see it ----------------------------------------------------------------------------

def test_anonymous_users_are_sent_to_the_login_page(client, embedded):
    response = client.get(CHANGELIST, {"q": QUERY})

    assert response.status_code == 302 and response.url.startswith("/admin/login/")
    assert b"Fasting" not in response.content


def test_logged_in_users_who_are_not_staff_are_sent_to_the_login_page(client, django_user_model, embedded):
    client.force_login(django_user_model.objects.create_user("reader", password="not-staff-1234"))

    response = client.get(CHANGELIST, {"q": QUERY})

    assert response.status_code == 302 and response.url.startswith("/admin/login/")


def test_staff_without_the_view_permission_are_refused(client, django_user_model, embedded):
    client.force_login(django_user_model.objects.create_user("clerk", password="staff-1234", is_staff=True))

    assert client.get(CHANGELIST, {"q": QUERY}).status_code == 403


def test_staff_with_the_view_permission_can_search(client, django_user_model, embedded):
    user = django_user_model.objects.create_user("viewer", password="staff-1234", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_segment"))
    client.force_login(user)

    response = client.get(CHANGELIST, {"q": QUERY})

    assert response.status_code == 200 and len(listed(response)) == len(TEXTS)


# --- Semantic search ---------------------------------------------------------------------------

def test_a_search_lists_segments_nearest_first_with_their_distances(admin_client, embedded, minilm):
    expected_ids, expected_distances = expected_ranking(minilm, embedded, QUERY)

    response = admin_client.get(CHANGELIST, {"q": QUERY})

    rows = listed(response)
    assert [row.pk for row in rows] == expected_ids
    assert [row.semantic_distance for row in rows] == pytest.approx(expected_distances, abs=1e-4)
    html = response.content.decode()
    assert '<th scope="col" class="column-distance">' in html
    for distance in expected_distances:
        assert f'<td class="field-distance">{distance:.4f}</td>' in html


def test_the_similarity_order_survives_pagination(admin_client, embedded, minilm, per_page):
    per_page(2)
    expected_ids, _ = expected_ranking(minilm, embedded, QUERY)

    pages = [listed(admin_client.get(CHANGELIST, {"q": QUERY, "p": page})) for page in (1, 2, 3)]

    assert [[row.pk for row in page] for page in pages] == [expected_ids[0:2], expected_ids[2:4], expected_ids[4:]]


def test_facet_counts_run_the_search_once_and_keep_its_order(admin_client, embedded, minilm):
    expected_ids, _ = expected_ranking(minilm, embedded, QUERY)
    searches = []
    original = SegmentAdmin._run_search

    def counting(self, request, term):
        searches.append(term)
        return original(self, request, term)

    SegmentAdmin._run_search = counting
    try:
        response = admin_client.get(CHANGELIST, {"q": QUERY, "_facets": "True"})
    finally:
        SegmentAdmin._run_search = original

    assert [row.pk for row in listed(response)] == expected_ids
    assert searches == [QUERY]


def test_a_column_the_user_sorts_by_wins_over_the_similarity_order(admin_client, embedded):
    columns = admin.site._registry[Segment].get_list_display(RequestFactory().get(CHANGELIST, {"q": QUERY}))

    response = admin_client.get(CHANGELIST, {"q": QUERY, "o": f"-{columns.index('timestamps')}"})

    assert [row.pk for row in listed(response)] == [s.pk for s in sorted(embedded, key=lambda s: -s.start_sec)]


def test_a_search_combines_with_the_list_filters(admin_client, embedded, minilm):
    podcast = [s for s in embedded if s.video_type == "podcast"]
    expected_ids, _ = expected_ranking(minilm, podcast, QUERY)

    for params in ({"video_type": "podcast"}, {"video_id": "v2"}, {"speaker_label": "Guest"}):
        response = admin_client.get(CHANGELIST, {"q": QUERY, **params})
        assert [row.pk for row in listed(response)] == expected_ids


def test_the_list_never_loads_vectors(admin_client, embedded):
    for params in ({}, {"q": QUERY}):
        rows = listed(admin_client.get(CHANGELIST, params))
        assert rows and all("embedding" in row.get_deferred_fields() for row in rows)


def test_with_the_reranker_enabled_results_carry_its_scores_best_first(admin_client, embedded, settings):
    settings.ENABLE_RERANKER = True
    settings.RERANKER_MODEL = MINILM_PATH  # an untrained head: the order is the plumbing's, not meaning's
    settings.RETURN_TOP_K = 3

    response = admin_client.get(CHANGELIST, {"q": QUERY})

    scores = [row.semantic_score for row in listed(response)]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert "column-rerank_score" in response.content.decode()


def test_a_reranker_that_cannot_load_is_reported_and_the_distance_order_kept(admin_client, embedded, minilm,
                                                                            settings, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings.ENABLE_RERANKER = True
    settings.RERANKER_MODEL = "no-such-org/no-such-reranker"
    expected_ids, _ = expected_ranking(minilm, embedded, QUERY)

    response = admin_client.get(CHANGELIST, {"q": QUERY})

    assert [row.pk for row in listed(response)] == expected_ids
    assert "Reranking disabled" in response.content.decode()


# --- Statuses and filters ----------------------------------------------------------------------

@pytest.fixture
def four_states(embedded):
    Segment.objects.filter(pk=embedded[1].pk).update(embedding=None)  # pending
    Segment.objects.filter(pk=embedded[2].pk).update(embedding=None)
    QuarantinedSegment.objects.create(segment_id=embedded[2].pk, text_md5="0" * 32, reason="tokenizer failed")
    blank = Segment.objects.create(video_id="v3", start_sec=0, end_sec=1, text="   ")
    return {"embedded": embedded[0], "pending": embedded[1], "quarantined": embedded[2], "blank": blank}


def test_each_segment_shows_its_embedding_status(admin_client, four_states):
    rows = {row.pk: row.embedding_status for row in listed(admin_client.get(CHANGELIST))}

    assert {status: rows[segment.pk] for status, segment in four_states.items()} == {
        "embedded": "embedded", "pending": "pending", "quarantined": "quarantined", "blank": "blank"}


@pytest.mark.parametrize("status", ["pending", "quarantined", "blank"])
def test_the_embedding_status_filter(admin_client, four_states, status):
    response = admin_client.get(CHANGELIST, {"embedding_status": status})

    assert [row.pk for row in listed(response)] == [four_states[status].pk]


def test_the_list_filters_are_video_speaker_video_type_and_status(admin_client, embedded):
    specs = admin_client.get(CHANGELIST).context["cl"].filter_specs

    assert [spec.title for spec in specs] == ["video id", "speaker label", "video type", "embedding status"]


# --- The fallbacks -----------------------------------------------------------------------------

@pytest.mark.parametrize("phase", ["legacy", "expanded"])
def test_before_the_swap_the_admin_says_so_and_searches_the_text(segments_at, admin_client, phase):
    segments_at(phase)
    match = Segment.objects.create(video_id="v1", start_sec=0, end_sec=1, text="Fasting lowers insulin.")
    Segment.objects.create(video_id="v1", start_sec=1, end_sec=2, text="Red meat.")

    response = admin_client.get(CHANGELIST, {"q": "insulin"})

    assert response.status_code == 200
    assert [row.pk for row in listed(response)] == [match.pk]
    html = response.content.decode()
    assert f"The new embeddings are not live yet (phase: {phase})" in html
    assert "manage.py embedding_switch swap" in html
    assert listed(response)[0].embedding_status == {"legacy": "no new column yet", "expanded": "pending"}[phase]


def test_without_a_loadable_model_the_admin_names_the_fix_and_searches_the_text(admin_client, embedded, settings,
                                                                               monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings.EMBEDDING_MODEL = "no-such-org/no-such-model"

    response = admin_client.get(CHANGELIST, {"q": "insulin"})

    assert [row.pk for row in listed(response)] == [embedded[0].pk]
    html = response.content.decode()
    assert "Semantic search is unavailable" in html and "EMBEDDING_MODEL=" in html


# --- The change form ---------------------------------------------------------------------------

def test_editing_a_segments_text_in_the_admin_sends_it_back_to_pending(admin_client, embedded):
    segment = embedded[0]
    form = admin_client.get(f"{CHANGELIST}{segment.pk}/change/")
    assert form.status_code == 200 and "embedded" in form.content.decode()

    response = admin_client.post(f"{CHANGELIST}{segment.pk}/change/", {
        "video_id": segment.video_id, "start_sec": segment.start_sec, "end_sec": segment.end_sec,
        "text": "A new sentence about eggs.", "speaker_label": segment.speaker_label or "",
        "video_type": segment.video_type or "", "speaker_confidence": "", "avg_logprob": "",
        "compression_ratio": "", "no_speech_prob": "", "temperature_used": "", "metadata": "null"})

    assert response.status_code == 302
    rows = {row.pk: row for row in listed(admin_client.get(CHANGELIST))}
    assert rows[segment.pk].text == "A new sentence about eggs." and rows[segment.pk].embedding_status == "pending"
    assert rows[embedded[1].pk].embedding_status == "embedded"


# --- Links to the moment in the video ----------------------------------------------------------

class Links(HTMLParser):
    """The attributes of every <a> whose href goes to YouTube."""

    def __init__(self, html):
        super().__init__()
        self.found = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a" and attrs.get("href", "").startswith("https://www.youtube.com/"):
            self.found.append(attrs)


def test_each_segment_links_to_its_moment_on_youtube_in_a_new_tab(admin_client, db):
    Segment.objects.create(video_id="dQw4w9WgXcQ", start_sec=61.9, end_sec=70, text="Fasting lowers insulin.")

    [link] = Links(admin_client.get(CHANGELIST).content.decode()).found

    assert link == {"href": "https://www.youtube.com/watch?v=dQw4w9WgXcQ&t=61s", "target": "_blank",
                    "rel": "noopener", "title": "Watch this moment on YouTube"}


def test_a_video_id_with_markup_or_url_characters_is_escaped_in_the_link(admin_client, db):
    Segment.objects.create(video_id='a&b"<i>x', start_sec=5.2, end_sec=6, text="Red meat.")

    html = admin_client.get(CHANGELIST).content.decode()

    assert Links(html).found[0]["href"] == "https://www.youtube.com/watch?v=a%26b%22%3Ci%3Ex&t=5s"
    assert 'href="https://www.youtube.com/watch?v=a%26b%22%3Ci%3Ex&amp;t=5s"' in html and "<i>x" not in html


def test_semantic_search_results_link_to_their_moments(admin_client, embedded, minilm):
    expected_ids, _ = expected_ranking(minilm, embedded, QUERY)
    by_id = {segment.pk: segment for segment in embedded}

    links = Links(admin_client.get(CHANGELIST, {"q": QUERY}).content.decode()).found

    assert [link["href"] for link in links] == [
        f"https://www.youtube.com/watch?v={by_id[pk].video_id}&t={int(by_id[pk].start_sec)}s" for pk in expected_ids]


def test_the_text_column_keeps_a_readable_width(admin_client, db):
    html = admin_client.get(CHANGELIST).content.decode()

    assert "td.field-excerpt { min-width: 16em; max-width: 48em; white-space: normal;" in html


# --- The "Embedding switch" page ---------------------------------------------------------------

def test_the_admin_index_links_to_the_embedding_switch_page(admin_client, db):
    html = admin_client.get("/admin/").content.decode()

    assert f'<a href="{SWITCH_PAGE}">Embedding switch</a>' in html


def test_anonymous_users_are_sent_from_the_switch_page_to_the_login_page(client, db):
    response = client.get(SWITCH_PAGE)

    assert response.status_code == 302 and response.url.startswith("/admin/login/")


def test_users_who_are_not_staff_are_sent_from_the_switch_page_to_the_login_page(client, django_user_model):
    client.force_login(django_user_model.objects.create_user("reader", password="not-staff-1234"))

    response = client.get(SWITCH_PAGE)

    assert response.status_code == 302 and response.url.startswith("/admin/login/")


def test_staff_without_the_view_permission_are_refused_the_switch_page(client, django_user_model):
    client.force_login(django_user_model.objects.create_user("clerk", password="staff-1234", is_staff=True))

    assert client.get(SWITCH_PAGE).status_code == 403


def test_staff_with_the_view_permission_see_the_switch_page(client, django_user_model):
    user = django_user_model.objects.create_user("operator", password="staff-1234", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_embeddingswitch"))
    client.force_login(user)

    response = client.get(SWITCH_PAGE)

    assert response.status_code == 200 and '<strong id="switch-phase">final</strong>' in response.content.decode()


def test_the_switch_page_shows_phase_progress_counts_swap_and_next_command(admin_client, segments_at):
    segments_at("expanded")
    for i, text in enumerate(["one", "two", "three", "four", "   "]):
        Segment.objects.create(video_id="v", start_sec=i, end_sec=i + 1, text=text)
    with connection.cursor() as cursor:
        cursor.execute("UPDATE segments SET embedding_384 = array_fill(0.5::real, ARRAY[384])::vector "
                       "WHERE text IN ('one', 'two', 'three')")

    response = admin_client.get(SWITCH_PAGE)

    assert response.status_code == 200
    html = response.content.decode()
    assert '<strong id="switch-phase">expanded</strong>' in html
    assert 'aria-valuenow="75.0"' in html and '<div style="width: 75.0%"></div>' in html
    assert "3 of 4 segments with text have their 384-dim vector" in html
    assert dict(re.findall(r'id="count-(\w+)">.*?<dd>([^<]*)</dd>', html, re.S)) == {
        "total": "5", "with_text": "4", "embedded": "3", "pending": "1", "quarantined": "0", "blank": "1"}
    assert response.context["status"]["rows"] == status.collect()["rows"]
    assert "<code>python manage.py backfill_embeddings</code>" in html
    assert "would be refused" in html and escape(swap.refusal()) in html
    assert [step["state"] for step in response.context["panel"]["steps"]] == ["done", "current", "todo", "todo", "todo"]


@pytest.mark.parametrize("phase, next_command", [("legacy", "python manage.py migrate"),
                                                 ("swapped", "python manage.py embedding_switch contract --confirm")])
def test_the_switch_page_shows_the_phase_and_next_command_before_and_after_the_swap(admin_client, segments_at, phase,
                                                                                   next_command):
    segments_at(phase)

    html = admin_client.get(SWITCH_PAGE).content.decode()

    assert f'<strong id="switch-phase">{phase}</strong>' in html and f"<code>{next_command}</code>" in html
