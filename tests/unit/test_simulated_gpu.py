"""The benchmark's simulated GPU: a fixed rate by sleeping (not by using the CPU), unit vectors,
and only ever on a benchmark scratch schema."""
import time

import numpy as np
import pytest
from django.core.exceptions import ImproperlyConfigured

from segments.benchmark.encoders import SimulatedGpuEncoder

TEXTS = [f"segment {i} about ketosis" for i in range(2000)]


def test_it_takes_the_time_of_its_rate_sleeping_not_computing():
    encoder = SimulatedGpuEncoder(texts_per_second=10_000)
    wall, cpu = time.perf_counter(), time.process_time()
    vectors = encoder.encode_documents(TEXTS)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert wall >= 0.2  # 2,000 texts at 10,000 texts/s
    assert cpu < wall / 2
    assert vectors.shape == (2000, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_calls_queue_behind_each_other_as_on_one_device():
    encoder = SimulatedGpuEncoder(texts_per_second=10_000)
    started = time.perf_counter()
    for _ in range(4):
        encoder.encode_documents(TEXTS[:500])
    assert time.perf_counter() - started >= 0.2


def test_the_same_text_gets_the_same_vector():
    first, second, _ = SimulatedGpuEncoder(dimensions=8).encode_documents(["steak", "steak", "eggs"])
    assert np.array_equal(first, second)


def test_only_a_benchmark_scratch_schema_is_accepted():
    encoder = SimulatedGpuEncoder()
    encoder.check_target('"benchmark_123_456", public')
    for search_path in (None, "public", "scratch, public", '"benchmark_x", public'):
        with pytest.raises(ImproperlyConfigured, match="only on the benchmark's scratch schemas"):
            encoder.check_target(search_path)
