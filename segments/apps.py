from django.apps import AppConfig
from django.core import checks


class SegmentsConfig(AppConfig):
    name = "segments"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from segments.checks import segments_table

        checks.register(segments_table, checks.Tags.database)
