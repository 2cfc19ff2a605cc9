from django.apps import AppConfig


class BenchmarkConfig(AppConfig):
    """`manage.py embedding_benchmark`; no models, no migrations."""

    name = "benchmark"
    verbose_name = "Embedding benchmark"
