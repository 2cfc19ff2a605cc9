"""Screenshots of the admin on the demo database, for the README: a semantic search's results, the
"Embedding switch" panel and its "Compare searches" page (the old and the new search side by side,
between phase 1 and the contract; after the whole demo it says there is nothing to compare), as
PNGs in docs/img/ (overwritten on every run).

    make demo                              # once: builds the demo database (askdrchaffee_demo)
    .venv/bin/python docs/screenshots.py   # --query "...", --out DIR

It starts `manage.py runserver` on a free port (DEBUG off, as deployed) with a staff account of
its own (`screenshots`, removed afterwards), and drives Debian's Chromium (`apt-get install
chromium`) with Playwright. Nothing is downloaded.
"""
import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1440, "height": 900}
QUERY = "Does red meat raise LDL cholesterol?"
USERNAME = "screenshots"
DEMO_ENV = {"EMBEDDED_DATABASE_NAME": "askdrchaffee_demo", "DEBUG": "false"}


def fail(message):
    sys.exit(f"screenshots: {message}")


def setup_django():
    """Django on the demo database (never DATABASE_URL's), from the project's root."""
    os.environ.pop("DATABASE_URL", None)
    os.environ.update(DEMO_ENV)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "askdrchaffee.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port, model, log):
    env = {**os.environ, **DEMO_ENV, "EMBEDDING_MODEL": model, "PYTHONUNBUFFERED": "1"}
    env.pop("DATABASE_URL", None)
    return subprocess.Popen([sys.executable, str(ROOT / "manage.py"), "runserver", "--noreload", f"127.0.0.1:{port}"],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait_for(url, process, log_path, seconds=60):
    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            fail(f"runserver exited ({process.returncode}):\n{Path(log_path).read_text()}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                fail(f"runserver did not answer within {seconds} s:\n{Path(log_path).read_text()}")
            time.sleep(0.2)


def take(base_url, password, query, out):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, viewport=VIEWPORT,
            color_scheme="light")
        try:
            page = context.new_page()
            page.goto(f"{base_url}/admin/login/?next=/admin/")
            page.fill("#id_username", USERNAME)
            page.fill("#id_password", password)
            page.click("input[type=submit]")
            page.wait_for_selector("#site-name")

            page.goto(f"{base_url}/admin/segments/segment/?{urllib.parse.urlencode({'q': query})}")
            try:
                page.wait_for_selector("#result_list td.field-distance", timeout=120_000)  # the model loads first
            except PlaywrightTimeout:
                notes = " / ".join(page.locator(".messagelist li").all_inner_texts()) or "none"
                fail(f"the search listed no distances, so it was not a semantic search (the page says: {notes})")
            searched = out / "admin-semantic-search.png"
            page.screenshot(path=str(searched))  # the first screenful: the search box and the nearest results

            page.goto(f"{base_url}/admin/")
            page.click("text=Embedding switch")
            page.wait_for_selector("#switch-phase")
            panel = out / "admin-embedding-switch.png"
            page.screenshot(path=str(panel), full_page=True)

            page.goto(f"{base_url}/admin/segments/embeddingswitch/compare/?{urllib.parse.urlencode({'q': query})}")
            page.wait_for_selector("#compare", timeout=120_000)  # both models embed the question first
            compared = out / "admin-compare-searches.png"
            page.screenshot(path=str(compared), full_page=True)
        finally:
            context.close()
    return searched, panel, compared


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--query", default=QUERY, help=f"the search to show (default: {QUERY!r})")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go (default: docs/img)")
    args = parser.parse_args()
    if not CHROMIUM.exists():
        fail(f"no Chromium at {CHROMIUM}: apt-get install -y chromium")

    setup_django()
    from django.contrib.auth import get_user_model
    from django.core.management.base import CommandError
    from django.db import connection, connections

    from segments.demo import require_demo_database
    from segments.management.commands.demo_staff import demo_model, reset_staff_account
    from segments.schema import TABLE

    try:
        require_demo_database()
    except CommandError as exc:
        fail(str(exc))
    if TABLE not in connection.introspection.table_names():
        fail("the demo database has no segments yet: run `make demo` first.")
    password = reset_staff_account(USERNAME)
    connections.close_all()
    args.out.mkdir(parents=True, exist_ok=True)

    port = free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as log:
        process = start_server(port, demo_model(), log)
    try:
        wait_for(f"http://127.0.0.1:{port}/admin/login/", process, log.name)
        for path in take(f"http://127.0.0.1:{port}", password, args.query, args.out):
            print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        get_user_model().objects.filter(username=USERNAME).delete()
        os.unlink(log.name)


if __name__ == "__main__":
    main()
