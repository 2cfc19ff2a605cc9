"""The admin's "Compare searches" page in a real browser (Debian's Chromium driven by Playwright):
staff log in, reach it from the "Embedding switch" page, ask a question, and read the old and the
new search side by side with their overlap. The screenshot goes to artifacts/.

Before the swap, on demo segments whose old column the 1536-dim stand-in wrote (`load_demo_segments
--legacy-model`) and whose new column MiniLM filled. Run with `pytest -m browser`.
"""
import re
from pathlib import Path

import pytest

from tests.browser.test_admin_browser import ARTIFACTS, CHROMIUM, log_in, page, staff  # noqa: F401 (fixtures)
from tests.db.test_compare import QUESTION, legacy_model, load_demo_with_both_models  # noqa: F401 (fixture)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}: apt-get install -y chromium"),
]


@pytest.fixture
def both_models(segments_at, settings, legacy_model, minilm, use_minilm):
    """Set up before the browser starts (Playwright's loop would make the database calls async-unsafe)."""
    load_demo_with_both_models(segments_at, settings, legacy_model, minilm)


def test_staff_compare_the_old_and_the_new_search_side_by_side(live_server, staff, both_models, page):
    log_in(page, live_server, staff, "/admin/")
    page.click("text=Embedding switch")
    page.click("#switch-compare a")
    page.wait_for_selector("#compare-question")
    page.fill("#compare-question", QUESTION)
    page.press("#compare-question", "Enter")
    page.wait_for_selector("#compare-overlap", timeout=120_000)  # each model embeds the question first

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "admin_compare_searches.png"), full_page=True)

    old, new = page.locator("#compare-old"), page.locator("#compare-new")
    assert old.locator("code.column").inner_text() == "segments.embedding"
    assert new.locator("code.column").inner_text() == "segments.embedding_384"
    assert old.locator("tr.hit").count() == 10 and new.locator("tr.hit").count() == 10
    old_box, new_box = old.bounding_box(), new.bounding_box()
    assert abs(old_box["y"] - new_box["y"]) < 2 and old_box["x"] + old_box["width"] <= new_box["x"]  # side by side

    shared = int(re.match(r"\d+", page.locator("#compare-shared dd").inner_text()).group())
    rbo = float(re.match(r"[\d.]+", page.locator("#compare-rbo dd").inner_text()).group())
    assert 0 < shared <= 10 and 0 < rbo <= 1
    assert old.locator("tr.hit.shared").count() == shared == new.locator("tr.hit.shared").count()
    assert old.locator("tr.hit.shared .mark").first.is_visible()
    assert old.locator("td.time a").first.get_attribute("href").startswith("https://www.youtube.com/watch?v=")
    assert Path(ARTIFACTS / "admin_compare_searches.png").stat().st_size > 0
