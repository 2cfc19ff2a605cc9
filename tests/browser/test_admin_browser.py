"""The admin in a real browser (Debian's Chromium driven by Playwright): the semantic search,
and the "Embedding switch" page while a backfill runs. Screenshots go to artifacts/.

Nothing is downloaded: Playwright drives the system Chromium (`apt-get install chromium`).
Run these alone with `pytest -m browser`; without /usr/bin/chromium they are skipped.
"""
import threading
from pathlib import Path

import numpy as np
import pytest
from django.db import connection, connections

from embeddings import ledger
from segments.models import Segment
from segments.schema import vector_column_types
from segments.switch.backfill import run_backfill
from tests.conftest import ROOT
from tests.embeddings.conftest import add_segments, sentences
from tests.embeddings.encoders import RecordingEncoder

CHROMIUM = Path("/usr/bin/chromium")
VIEWPORT = {"width": 1440, "height": 900}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "artifacts"
PASSWORD = "a-long-staff-password-1"
QUERY = "going without food"
TEXTS = [
    "Fasting lowers insulin within a day.",
    "Red meat is rich in protein and fat.",
    "Plants produce toxins to deter animals.",
    "Ketones fuel the brain during a fast.",
    "The video was recorded in a studio, and in the second half the host answers questions sent in by "
    "viewers about sleep, training on an empty stomach, how long adaptation takes, and whether salt and "
    "electrolytes matter more in the first weeks than later on.",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}: apt-get install -y chromium"),
]


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_user("editor", password=PASSWORD, is_staff=True, is_superuser=True)


def rebuild_vector_index():
    """Rebuild the HNSW graph from this test's rows only (see tests/db/test_search.py)."""
    with connection.cursor() as cursor:
        cursor.execute("REINDEX INDEX segments_embedding_hnsw")


@pytest.fixture
def segments(transactional_db, minilm, use_minilm):
    vectors = minilm.encode_documents(TEXTS)
    rows = [Segment.objects.create(video_id="abc123", start_sec=30 * i, end_sec=30 * i + 20, speaker_label="Chaffee",
                                   text=text, embedding=vector) for i, (text, vector) in enumerate(zip(TEXTS, vectors))]
    rebuild_vector_index()
    return rows


@pytest.fixture
def page(tmp_path):
    """A page in a fresh headless Chromium profile (no browser download: the system Chromium)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport=VIEWPORT)
        try:
            yield context.new_page()
        finally:
            context.close()


def nearest_first(minilm, query):
    query_vector = minilm.encode_query(query)
    distances = {text: 1 - float(np.dot(query_vector, vector))
                 for text, vector in zip(TEXTS, minilm.encode_documents(TEXTS))}
    return sorted(distances, key=distances.get), sorted(distances.values())


def log_in(page, live_server, staff, path):
    page.goto(f"{live_server.url}{path}")
    assert "/admin/login/" in page.url  # anonymous: sent to the login page
    page.fill("#id_username", staff.username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")


def test_staff_log_in_and_see_ranked_results_with_distances(live_server, staff, segments, minilm, page):
    expected_texts, expected_distances = nearest_first(minilm, QUERY)

    log_in(page, live_server, staff, "/admin/segments/segment/")
    page.wait_for_selector("#searchbar")
    page.fill("#searchbar", QUERY)
    page.press("#searchbar", "Enter")
    page.wait_for_selector("#result_list td.field-distance")

    texts = page.locator("#result_list tbody td.field-excerpt").all_inner_texts()
    distances = [float(text) for text in page.locator("#result_list tbody td.field-distance").all_inner_texts()]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "admin_semantic_search.png"), full_page=True)

    assert page.locator("th.column-distance").inner_text().strip().lower() == "distance"
    assert texts == expected_texts
    assert distances == pytest.approx(expected_distances, abs=1e-3)
    assert distances == sorted(distances)
    widths = page.locator("#result_list tbody td.field-excerpt").evaluate_all("cells => cells.map(c => c.clientWidth)")
    assert min(widths) >= 200  # the text reads as lines (some 30 characters), not a word per line
    assert page.locator("#result_list td.field-embedding_status").first.is_visible()
    assert page.evaluate("() => { const r = document.querySelector('.results'); "
                         "return r.scrollWidth <= r.clientWidth; }")  # every column fits: nothing scrolled away
    assert page.locator("#result_list tbody td.field-timestamps a").first.get_attribute("rel") == "noopener"


@pytest.fixture
def running_backfill(segments_at):
    """The expanded phase, 60% of the segments embedded, and a slow backfill running on the rest
    (stopped when the test ends)."""
    segments_at("expanded")
    ids = add_segments(sentences(1000))
    stop = threading.Event()
    encoder = RecordingEncoder(delay=1.0)
    encoder.device = "cpu"
    with connection.cursor() as cursor:  # as if this encoder had written them: the ledger records it
        ledger.record(cursor, "segments", "embedding_384", encoder.model_identity(),
                      vector_column_types()["embedding_384"][0], "first write")
        cursor.execute("UPDATE segments SET embedding_384 = array_fill(0.5::real, ARRAY[384])::vector "
                       "WHERE id = ANY(%s)", [ids[:600]])

    def backfill():
        try:
            run_backfill(encoder, batch_size=5, progress=lambda done, total: stop.is_set() and 1 / 0)
        except ZeroDivisionError:
            pass  # stopped by the test
        finally:
            connections.close_all()

    thread = threading.Thread(target=backfill)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_the_embedding_switch_page_reads_at_a_glance_during_a_backfill(live_server, staff, running_backfill, page):
    log_in(page, live_server, staff, "/admin/")
    page.click("text=Embedding switch")
    page.wait_for_selector("#switch-phase")
    for _ in range(60):  # until the worker has written a batch
        rows = page.locator("#switch-backfill tbody td:nth-child(5)")  # rows done
        if rows.count() and rows.first.inner_text() != "0":
            break
        page.wait_for_timeout(500)
        page.reload()

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "admin_embedding_switch.png"), full_page=True)

    assert page.locator("#switch-phase").inner_text() == "expanded"
    assert page.locator("#switch-next code").inner_text() == "python manage.py embedding_switch index"
    assert page.locator("#switch-backfill tbody tr").count() == 1
    headers = [header.strip().lower() for header in page.locator("#switch-backfill thead th").all_text_contents()]
    cells = dict(zip(headers, page.locator("#switch-backfill tbody td").all_inner_texts()))
    assert (cells["mode"], cells["device"], cells["column"]) == ("backfill", "cpu", "embedding_384")
    progress = float(page.locator("#switch-progress [role=progressbar]").get_attribute("aria-valuenow"))
    assert 60.0 < progress < 100.0
    assert page.locator("#switch-steps li.current").inner_text().endswith("Backfill")
