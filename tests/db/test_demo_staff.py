"""`demo_staff` (what `make admin` runs): a superuser for the demo database, with a new password
each time, and never on a database that is not a demo one."""
import io
import re
from contextlib import contextmanager, nullcontext

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test import Client

from segments.demo import drop_segments


@contextmanager
def named_as_demo():
    """The test database under a `_demo` name, as the command sees it, while the block runs. The
    open connection stays on the test database: nothing in the block may open another one."""
    connection.ensure_connection()
    name = connection.settings_dict["NAME"]
    connection.settings_dict["NAME"] = name + "_demo"
    try:
        yield
    finally:
        connection.settings_dict["NAME"] = name


def demo_staff(*args, on_demo_database=True):
    out = io.StringIO()
    with named_as_demo() if on_demo_database else nullcontext():
        call_command("demo_staff", *args, stdout=out)
    return out.getvalue()


def printed_login(output):
    """The URL, username and password the command printed."""
    return tuple(re.search(rf"{label}\s+(\S+)", output)[1] for label in ("log in at", "username", "password"))


def admin_index(username, password):
    """The admin index as a browser logging in with these credentials gets it (None: refused)."""
    client = Client()
    response = client.post("/admin/login/?next=/admin/", {"username": username, "password": password})
    if response.status_code != 302:
        return None
    return client.get(response["Location"]).content.decode()


def test_it_refuses_a_database_that_is_not_a_demo_one(db):
    with pytest.raises(CommandError, match=r"ends in '_demo'.*createsuperuser"):
        demo_staff(on_demo_database=False)
    assert not get_user_model().objects.exists()


def test_it_makes_a_superuser_who_can_log_in_to_the_admin(db):
    url, username, password = printed_login(demo_staff())

    assert url == "http://127.0.0.1:8000/admin/"
    assert username == "demo"
    page = admin_index(username, password)
    assert page is not None, "the printed credentials do not log in"
    assert "Embedding switch" in page  # a superuser: the switch's panel is listed
    assert admin_index(username, password + "x") is None


def test_running_it_again_gives_a_new_password_and_the_old_one_stops_working(db):
    *_, first = printed_login(demo_staff())
    *_, second = printed_login(demo_staff())

    assert first != second
    assert admin_index("demo", first) is None
    assert admin_index("demo", second) is not None
    assert get_user_model().objects.filter(username="demo").count() == 1


def test_it_resets_an_account_that_was_demoted(db, django_user_model):
    django_user_model.objects.create_user("demo", password="old-password-1", is_staff=False, is_active=False)

    *_, password = printed_login(demo_staff())

    assert admin_index("demo", "old-password-1") is None
    assert admin_index("demo", password) is not None


def test_without_demo_data_it_says_to_run_the_demo_first(segments_at):
    drop_segments()  # the final phase is restored after the test

    with pytest.raises(CommandError, match="no demo data yet: run `make demo` first"):
        demo_staff()
    assert not get_user_model().objects.exists()
