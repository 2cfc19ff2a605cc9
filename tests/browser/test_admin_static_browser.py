"""The admin as `manage.py runserver` serves it with the default settings (DEBUG off, no
`collectstatic`): styled by Django's own stylesheet, in a real browser (Debian's Chromium).

Run these alone with `pytest -m browser`; without /usr/bin/chromium they are skipped.
"""
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.browser.test_admin_browser import CHROMIUM, CHROMIUM_ARGS, VIEWPORT
from tests.conftest import ROOT, database_url

PASSWORD = "a-long-staff-password-2"
STYLESHEET = "/static/admin/css/base.css"
# Django 5.2's admin/css/base.css, light theme: #header's background is --secondary (#417690),
# the body's font is --font-family-primary, and dark_mode.css draws the theme icons 1.5rem wide.
HEADER_BACKGROUND = "rgb(65, 118, 144)"
BODY_FONT_START = '"Segoe UI", system-ui, Roboto'
ICON_MAX_PX = 24

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}: apt-get install -y chromium"),
]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url):
    """(status, Content-Type) of a GET."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"]


@pytest.fixture
def runserver(transactional_db, tmp_path):
    """`manage.py runserver --noreload` on a free port, on the test database, DEBUG off; its URL.
    Stopped by SIGTERM when the test ends, whatever happens."""
    url = f"http://127.0.0.1:{free_port()}"
    log_path = tmp_path / "runserver.log"
    env = {**os.environ, "DATABASE_URL": database_url(), "DEBUG": "false", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, str(ROOT / "manage.py"), "runserver", "--noreload",
                                    url.removeprefix("http://")], env=env, cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"runserver exited ({process.returncode}):\n{log_path.read_text()}")
            try:
                urllib.request.urlopen(f"{url}/admin/login/", timeout=2).close()
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    pytest.fail(f"runserver did not answer within 60 s:\n{log_path.read_text()}")
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_user("stylist", password=PASSWORD, is_staff=True, is_superuser=True)


@pytest.fixture
def page(tmp_path):
    """A page in a fresh headless Chromium profile, in the light theme (the values above are its)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport=VIEWPORT, color_scheme="light")
        try:
            yield context.new_page()
        finally:
            context.close()


def test_runserver_with_debug_off_serves_a_styled_admin(runserver, staff, page):
    status, content_type = get(f"{runserver}{STYLESHEET}")
    assert (status, content_type.split(";")[0]) == (200, "text/css"), f"{STYLESHEET} answered {status}"

    page.goto(f"{runserver}/admin/")
    page.fill("#id_username", staff.username)
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_selector("#site-name")

    assert page.eval_on_selector("#header", "e => getComputedStyle(e).backgroundColor") == HEADER_BACKGROUND
    assert page.evaluate("() => getComputedStyle(document.body).fontFamily").startswith(BODY_FONT_START)
    icon_widths = page.locator(".theme-toggle svg").evaluate_all(
        "icons => icons.map(icon => icon.getBoundingClientRect().width)")
    assert icon_widths and max(icon_widths) <= ICON_MAX_PX  # not the large black squares of an unstyled page
