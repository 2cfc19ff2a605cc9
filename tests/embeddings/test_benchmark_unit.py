"""The benchmark's logic that needs no database: recall, choosing ef_search, comparing runs,
the synthetic vectors, the model shape and the command's option parsing."""
import argparse

import numpy as np
import pytest

from segments.benchmark import encoders, report, search
from segments.management.commands.embedding_benchmark import positive_ints


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
    vectors = search.word_vectors(
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
    query = row + search.QUERY_NOISE * noise / np.linalg.norm(noise)
    query /= np.linalg.norm(query)
    assert 0.85 < float(row @ query) < 0.95  # near, not identical: cos = 1 / sqrt(1 + noise^2)


def results(texts_per_s, p50_ms):
    return {"machine": {"cpu": "x", "gpu": None},
            "encode": {"best_texts_per_s": texts_per_s, "best_batch_size": 32, "runs": []},
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


def test_batch_size_lists_are_parsed_and_bad_ones_refused():
    assert positive_ints("16,32, 64") == (16, 32, 64)
    for bad in ("", "0,8", "x"):
        with pytest.raises(ValueError):
            positive_ints(bad)
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", type=positive_ints)
    with pytest.raises(SystemExit):
        parser.parse_args(["--batch-sizes", "-4"])


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
