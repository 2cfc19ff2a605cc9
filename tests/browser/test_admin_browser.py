"""The admin's semantic search in a real browser: Debian's Chromium driven by Playwright.

Nothing is downloaded: Playwright drives the system Chromium (`apt-get install chromium`).
Run these alone with `pytest -m browser`; without /usr/bin/chromium they are skipped.
"""
from pathlib import Path

import numpy as np
import pytest
from django.db import connection

from segments.models import Segment
from tests.conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
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
    "The video was recorded in a studio.",
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
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield context.new_page()
        finally:
            context.close()


def nearest_first(minilm, query):
    query_vector = minilm.encode_query(query)
    distances = {text: 1 - float(np.dot(query_vector, vector))
                 for text, vector in zip(TEXTS, minilm.encode_documents(TEXTS))}
    return sorted(distances, key=distances.get), sorted(distances.values())


def test_staff_log_in_and_see_ranked_results_with_distances(live_server, staff, segments, minilm, page):
    expected_texts, expected_distances = nearest_first(minilm, QUERY)

    page.goto(f"{live_server.url}/admin/segments/segment/")
    assert "/admin/login/" in page.url  # anonymous: sent to the login page
    page.fill("#id_username", staff.username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
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
