"""Joins the end of the first switch (0010) and 0011, which a plain `migrate` applies at any phase
(the app keeps one last migration, which the next switch's migrations follow). Nothing to run."""
from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("segments", "0010_first_switch_done"),
        ("segments", "0011_worker_link_and_pause"),
    ]

    operations = []
