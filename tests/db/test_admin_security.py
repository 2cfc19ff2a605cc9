"""The Segment admin under hostile input: SQL-looking searches change nothing, every POST needs CSRF."""
import pytest
from django.db import connection
from django.test import Client

from segments.models import Segment

CHANGELIST = "/admin/segments/segment/"
HOSTILE = [
    "'; DROP TABLE segments; --",
    "%' OR 1=1 --",
    "\" OR \"\"=\"",
    "x'); DELETE FROM segments WHERE ('1'='1",
    "1; UPDATE segments SET text = 'owned'",
    "\\'; TRUNCATE auth_user; --",
]


def snapshot():
    """Everything an injection could change: rows, texts, users, columns, indexes, tables."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*), string_agg(text, '|' ORDER BY id) FROM segments")
        segments = cursor.fetchone()
        cursor.execute("SELECT count(*) FROM auth_user")
        users = cursor.fetchone()
        cursor.execute("SELECT table_name, column_name, data_type FROM information_schema.columns "
                       "WHERE table_schema = 'public' ORDER BY 1, 2")
        columns = cursor.fetchall()
        cursor.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1")
        indexes = cursor.fetchall()
    return segments, users, columns, indexes


def rebuild_vector_index():
    """Rebuild the HNSW graph from this test's rows only (see tests/db/test_search.py)."""
    with connection.cursor() as cursor:
        cursor.execute("REINDEX INDEX segments_embedding_hnsw")


@pytest.fixture
def segments(db, minilm, use_minilm):
    texts = ["Fasting lowers insulin.", "Red meat is rich in protein.", "Plants produce toxins."]
    rows = [Segment.objects.create(video_id="v1", start_sec=i, end_sec=i + 1, text=text, embedding=vector)
            for i, (text, vector) in enumerate(zip(texts, minilm.encode_documents(texts)))]
    rebuild_vector_index()
    return rows


@pytest.mark.parametrize("query", HOSTILE)
def test_sql_looking_semantic_searches_return_normally_and_change_nothing(admin_client, segments, query):
    before = snapshot()

    response = admin_client.get(CHANGELIST, {"q": query})

    assert response.status_code == 200
    assert len(response.context["cl"].result_list) == len(segments)  # ranked like any other words
    assert snapshot() == before


@pytest.mark.parametrize("query", HOSTILE)
def test_sql_looking_text_searches_before_the_swap_return_normally_and_change_nothing(segments_at, admin_client,
                                                                                     query):
    segments_at("expanded")
    Segment.objects.create(video_id="v1", start_sec=0, end_sec=1, text="Fasting lowers insulin.")
    before = snapshot()

    response = admin_client.get(CHANGELIST, {"q": query})

    assert response.status_code == 200
    assert list(response.context["cl"].result_list) == []  # no text contains these words
    assert snapshot() == before


@pytest.fixture
def strict_staff_client(admin_user):
    """A logged-in superuser whose client enforces CSRF like a browser session would."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    return client


def test_an_admin_action_without_a_csrf_token_is_refused(strict_staff_client, segments):
    before = snapshot()

    response = strict_staff_client.post(CHANGELIST, {
        "action": "delete_selected", "_selected_action": [s.pk for s in segments], "post": "yes"})

    assert response.status_code == 403
    assert snapshot() == before


def test_editing_a_segment_without_a_csrf_token_is_refused(strict_staff_client, segments):
    response = strict_staff_client.post(f"{CHANGELIST}{segments[0].pk}/change/", {
        "video_id": "v1", "start_sec": 0, "end_sec": 1, "text": "rewritten"})

    assert response.status_code == 403
    segments[0].refresh_from_db(fields=["text"])
    assert segments[0].text == "Fasting lowers insulin."


def test_logging_in_without_a_csrf_token_is_refused(db, django_user_model):
    django_user_model.objects.create_user("boss", password="a-long-password-1", is_staff=True)

    response = Client(enforce_csrf_checks=True).post("/admin/login/", {"username": "boss",
                                                                       "password": "a-long-password-1"})

    assert response.status_code == 403


def test_the_same_action_with_its_csrf_token_goes_through(strict_staff_client, segments):
    page = strict_staff_client.get(CHANGELIST)
    token = page.cookies["csrftoken"].value if "csrftoken" in page.cookies else page.context["csrf_token"]

    response = strict_staff_client.post(CHANGELIST, {
        "action": "delete_selected", "_selected_action": [segments[0].pk], "post": "yes",
        "csrfmiddlewaretoken": str(token)})

    assert response.status_code == 302
    assert not Segment.objects.filter(pk=segments[0].pk).exists()
