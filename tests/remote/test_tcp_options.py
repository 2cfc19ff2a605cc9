"""Every TCP connection notices a silent link within 30 s by default; a URL's own values win."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

DEFAULTS = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
            "tcp_user_timeout": 25000, "connect_timeout": 10}
RENDER = "postgresql://app:secret@dpg-abc123-a.frankfurt-postgres.render.com/app"


def options(**env):
    """(DATABASE_URL's options, DATABASE_DIRECT_URL's libpq parameters) as the settings make them."""
    result = subprocess.run(
        [sys.executable, "-c", "import django, json; django.setup(); from django.conf import settings; "
                               "from askdrchaffee.postgres import connection_params; "
                               "params = connection_params(direct=True)[1]; params.pop('cursor_factory'); "
                               "print(json.dumps([settings.DATABASES['default'].get('OPTIONS', {}), params]))"],
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "askdrchaffee.settings", "DATABASE_DIRECT_URL": "", **env},
        cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_tcp_url_gets_the_keepalive_defaults():
    url_options, _ = options(DATABASE_URL=f"{RENDER}?sslmode=require")
    assert url_options == {**DEFAULTS, "sslmode": "require"}


def test_the_url_s_own_values_win():
    url_options, _ = options(DATABASE_URL=f"{RENDER}?sslmode=require&keepalives_idle=60&tcp_user_timeout=0")
    assert url_options == {**DEFAULTS, "sslmode": "require", "keepalives_idle": 60, "tcp_user_timeout": 0}


def test_the_direct_url_gets_them_too_and_keeps_what_database_url_says():
    _, direct = options(DATABASE_URL=f"{RENDER}?keepalives_idle=60",
                        DATABASE_DIRECT_URL="postgresql://app:secret@10.0.0.5:5432/app?keepalives_count=5")
    assert {name: direct[name] for name in DEFAULTS} == {**DEFAULTS, "keepalives_idle": 60, "keepalives_count": 5}
    assert direct["host"] == "10.0.0.5"


@pytest.mark.parametrize("url", ["postgresql://postgres@/app?host=/var/run/postgresql", ""])
def test_a_unix_socket_gets_none(url):
    url_options, _ = options(DATABASE_URL=url)  # "": the embedded server, on its socket
    assert not set(DEFAULTS) & set(url_options)
