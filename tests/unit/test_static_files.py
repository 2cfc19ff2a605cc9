"""Static files with DEBUG off (as tests run): served by WhiteNoise without `collectstatic`, and
hashed, compressed and cached forever after it (a deploy's build step). No database."""
import gzip

import pytest
from django.core.management import call_command
from django.templatetags.static import static
from django.test import Client

STYLESHEET = "admin/css/base.css"
FOREVER = "max-age=315360000, public, immutable"


@pytest.fixture
def static_root(settings, tmp_path):
    """An empty STATIC_ROOT of this test's own (the links and the middleware are rebuilt for it)."""
    settings.STATIC_ROOT = tmp_path / "staticfiles"
    settings.STATIC_ROOT.mkdir()
    return settings.STATIC_ROOT


def test_without_collectstatic_pages_link_the_admin_stylesheet_and_it_is_served(static_root):
    url = static(STYLESHEET)
    response = Client().get(url)

    assert url == f"/static/{STYLESHEET}"
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/css")
    assert b"--header-bg" in b"".join(response.streaming_content)


def test_after_collectstatic_the_stylesheet_is_hashed_compressed_and_cached_forever(static_root):
    call_command("collectstatic", interactive=False, verbosity=0)
    url = static(STYLESHEET)
    response = Client().get(url, headers={"accept-encoding": "gzip"})

    assert url != f"/static/{STYLESHEET}" and url.startswith("/static/admin/css/base.")  # its content's hash
    assert (static_root / "staticfiles.json").exists()
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/css")
    assert response["Content-Encoding"] == "gzip"
    assert response["Cache-Control"] == FOREVER
    assert b"--header-bg" in gzip.decompress(b"".join(response.streaming_content))
