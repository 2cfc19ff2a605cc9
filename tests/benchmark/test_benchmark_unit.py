"""The benchmark's logic that needs no database: recall, choosing ef_search, comparing runs,
the synthetic vectors, the model shape and the command's option parsing."""
import argparse

import numpy as np
import pytest

from benchmark import derived, encoders, filtered, report, search, search_queries, search_sets, truth
from benchmark.management.commands.embedding_benchmark import memory_size, positive_ints, type_names


def hits(*distances):
    return [(i, distance) for i, distance in enumerate(distances)]


def test_recall_counts_the_rows_found_within_the_exact_tenth_distance():
    exact = [hits(*[0.1 * i for i in range(10)])]
    all_found = [hits(*[0.1 * i for i in range(10)])]
    half_found = [hits(*([0.1 * i for i in range(5)] + [2.0] * 5))]
    assert search.recall(all_found, exact) == 1.0
    assert search.recall(half_found, exact) == 0.5


def test_recall_does_not_count_a_tie_with_an_identical_vector_as_a_miss():
    exact = [[(1, 0.0), (2, 0.2), (3, 0.2)]]
    found = [[(1, 0.0), (2, 0.2), (9, 0.2)]]  # row 9 has the same vector as row 3
    assert search.recall(found, exact) == 1.0


def sweep(*recalls):
    return [{"ef_search": ef, "p50_ms": ef / 10, "p95_ms": ef / 5, "recall_at_10": r}
            for ef, r in zip((10, 40, 100, 400), recalls)]


def test_the_chosen_ef_search_is_the_smallest_reaching_the_recall_target():
    best, reached = search.chosen(sweep(0.80, 0.96, 0.99, 1.0))
    assert (best["ef_search"], reached) == (40, True)


def test_without_an_ef_search_reaching_the_target_the_best_recall_is_reported_as_not_reached():
    best, reached = search.chosen(sweep(0.50, 0.70, 0.90, 0.90))
    assert (best["ef_search"], reached) == (100, False)


def test_word_vectors_put_texts_sharing_words_closer_than_unrelated_ones():
    vectors = search_sets.word_vectors(
        ["insulin resistance and ketosis", "ketosis and insulin resistance again", "sleep quality of athletes"], 384
    )
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > 0.7 > abs(vectors[0] @ vectors[2])


def test_perturbed_queries_stay_near_their_row():
    rng = np.random.default_rng(1)
    row = rng.standard_normal(384).astype(np.float32)
    row /= np.linalg.norm(row)
    noise = rng.standard_normal(384).astype(np.float32)
    query = row + search_sets.QUERY_NOISE * noise / np.linalg.norm(noise)
    query /= np.linalg.norm(query)
    assert 0.85 < float(row @ query) < 0.95  # near, not identical: cos = 1 / sqrt(1 + noise^2)


def results(texts_per_s, p50_ms):
    return {"machine": {"cpu": "x", "gpu": None},
            "encode": {"best_texts_per_s": texts_per_s, "best_texts_per_call": 32, "runs": []},
            "search": {"p50_ms": p50_ms, "ef_search": 40, "recall_at_10": 0.97}}


def test_compare_says_which_changes_are_better_and_which_worse():
    changes = {c["figure"]: c for c in report.compare(results(100.0, 2.0), results(150.0, 3.0))}
    assert changes["encode.best_texts_per_s"]["change_pct"] == pytest.approx(50.0)
    assert changes["encode.best_texts_per_s"]["verdict"] == "better"
    assert changes["search.p50_ms"]["verdict"] == "worse"  # slower queries
    assert changes["search.recall_at_10"]["verdict"] == ""  # unchanged
    assert "encode.runs" not in changes  # lists are not figures


def test_the_comparison_names_each_figure_with_both_values():
    lines = "\n".join(report.render_comparison(results(100.0, 2.0), results(50.0, 1.0)))
    assert "encode.best_texts_per_s" in lines and "100.00" in lines and "50.00" in lines and "-50.0%" in lines


def test_texts_per_call_lists_are_parsed_and_bad_ones_refused():
    assert positive_ints("16,32, 64") == (16, 32, 64)
    for bad in ("", "0,8", "x"):
        with pytest.raises(ValueError):
            positive_ints(bad)
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts-per-call", type=positive_ints)
    with pytest.raises(SystemExit):
        parser.parse_args(["--texts-per-call", "-4"])


@pytest.mark.slow
def test_the_bge_small_shape_has_bge_small_en_v1_5s_configuration_and_says_its_vectors_mean_nothing():
    model = encoders.build_shaped_encoder("bge-small", "cpu")
    config = model[0].model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.num_attention_heads,
            config.vocab_size, config.max_position_embeddings) == (12, 384, 1536, 12, 30522, 512)
    assert model.max_seq_length == 512
    vectors = model.encode(["steak and eggs", "ketosis"], normalize_embeddings=True)
    assert vectors.shape == (2, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    service = encoders.ShapedService("bge-small", device="cpu", dimensions=384)
    assert "meaningless" in encoders.model_label(service)


def test_memory_sizes_and_search_types_are_parsed_and_bad_ones_refused():
    assert memory_size("3GB") == 3 * 2**30 and memory_size("512 mb") == 512 * 2**20
    assert type_names("halfvec, vector,halfvec") == ("halfvec", "vector")
    for parse, bad in ((memory_size, "512"), (memory_size, "512kB"), (memory_size, "lots"),
                       (type_names, "vector,bitvec"), (type_names, "")):
        with pytest.raises(ValueError):
            parse(bad)


def test_the_exact_answer_is_the_k_nearest_by_cosine_distance_over_blocks():
    rng = np.random.default_rng(4)
    rows, queries = rng.standard_normal((1000, 16)), rng.standard_normal((5, 16))
    ids = np.arange(100, 1100)
    found = truth.top_k(rows, ids, queries, 10, block=64)  # many blocks, one partial
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    for query, answer in zip(queries, found):
        distance = 1 - unit @ (query / np.linalg.norm(query))
        expected = np.argsort(distance)[:10]
        assert [row_id for row_id, _ in answer] == list(ids[expected])
        assert [d for _, d in answer] == pytest.approx(distance[expected], abs=1e-5)


def test_the_exact_filtered_answer_only_holds_rows_of_the_video():
    rng = np.random.default_rng(5)
    rows, videos = rng.standard_normal((500, 8)), filtered.assign_videos(500, seed=1)
    found = truth.filtered_top_k(rows, np.arange(500), videos, 1, rng.standard_normal((3, 8)), 10)
    assert all(len(answer) == 10 and all(videos[row_id] == 1 for row_id, _ in answer) for answer in found)


def test_filter_videos_hold_about_ten_and_one_percent_of_the_rows():
    videos = filtered.assign_videos(200_000, seed=0)
    assert np.mean(videos == 1) == pytest.approx(0.10, abs=0.005)
    assert np.mean(videos == 2) == pytest.approx(0.01, abs=0.001)


class CountingEncoder:
    def __init__(self):
        self.calls = 0

    def encode_documents(self, texts):
        self.calls += 1
        return np.random.default_rng(len(texts)).standard_normal((len(texts), 8), dtype=np.float32)


def test_embedded_base_texts_are_cached_by_model_and_texts(tmp_path):
    encoder = CountingEncoder()
    first, cached = derived.embedded(encoder, ["a", "b", "c"], "documents", tmp_path, "model-a")
    again, cached_again = derived.embedded(encoder, ["a", "b", "c"], "documents", tmp_path, "model-a")
    derived.embedded(encoder, ["a", "b", "c"], "documents", tmp_path, "model-b")
    derived.embedded(encoder, ["a", "b", "d"], "documents", tmp_path, "model-a")
    assert (cached, cached_again, encoder.calls) == (False, True, 3)
    assert np.array_equal(first, again) and np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-6)


def test_derived_vectors_are_unit_vectors_repeatable_by_seed_with_every_origin_used_equally():
    base = derived.normalise(np.random.default_rng(6).standard_normal((50, 32), dtype=np.float32))
    rows = derived.derive(base, 500, seed=3)
    assert rows.shape == (500, 32) and rows.dtype == np.float32
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(rows, derived.derive(base, 500, seed=3))
    assert not np.array_equal(rows, derived.derive(base, 500, seed=4))
    assert np.bincount(derived.origins(500, 50, seed=3)).tolist() == [10] * 50
    with pytest.raises(ValueError, match="at least 2 base vectors"):
        derived.derive(base[:1], 10)


def test_rows_found_in_one_type_are_rescored_in_float32_against_the_float32_answer():
    ids = np.array([3, 7, 9])
    vectors = np.array([[1, 0], [0.6, 0.8], [0, 1]], dtype=np.float32)
    found = [[(9, 0.5), (3, 0.5)]]  # distances as a rounded column gave them
    [rescored] = search_queries.rescored(found, ids, vectors, np.array([[2, 0]], dtype=np.float32))
    assert [row_id for row_id, _ in rescored] == [9, 3]
    assert [distance for _, distance in rescored] == pytest.approx([1.0, 0.0])
