"""The evaluation's rules without a database: the paired interval, the verdict, the vectors' health, the
labelled file's format and the batched searches' arithmetic (segments/evaluation/)."""
import math

import numpy as np
import pytest

from segments.evaluation import health, queries, searching, stats
from segments.evaluation.metrics import judged
from segments.evaluation.queries import Query
from segments.evaluation.verdict import GO, INCONCLUSIVE, NO_GO, Rules, decide


def ranks(hits):
    """Ranks from 0/1 outcomes: answered first, or not in the top 10."""
    return [1 if hit else None for hit in hits]


def figures(old, new, slice_of=None):
    asked = [Query("q", "known-item", None, {"speaker": slice_of(i) if slice_of else "Chaffee"})
             for i in range(len(old))]
    return judged(asked, ranks(old), ranks(new))


def test_agreeing_queries_never_prove_that_nothing_changed():
    few = stats.paired_change([1] * 30, [1] * 30)
    many = stats.paired_change([1] * 600, [1] * 600)

    assert few["change"] == 0 and few["low"] < -0.03  # about 2/n wide: 30 queries prove little
    assert many["change"] == 0 and -0.004 < many["low"] < 0


def test_a_real_fall_beyond_the_tolerance_is_a_no_go_naming_the_figures():
    found = decide([("known-item queries", figures([1] * 300, [1] * 240 + [0] * 60))], [], None, Rules())

    assert found["verdict"] == NO_GO and found["exit_status"] == 1
    assert found["reasons"][0].startswith("recall@10 fell from 1.000 to 0.800 (-0.200, 95% interval")
    assert "over 300 known-item queries: more than the tolerance 0.02" in found["reasons"][0]


def test_no_fall_on_enough_queries_is_a_go_and_on_few_queries_inconclusive():
    same = [1] * 250 + [0] * 50

    assert decide([("known-item queries", figures(same, same))], [], None, Rules())["verdict"] == GO
    few = decide([("known-item queries", figures(same[:20], same[:20]))], [], None, Rules())
    assert few["verdict"] == INCONCLUSIVE and few["exit_status"] == 3
    assert "too few queries to judge (20 known-item queries; at least 30 are needed)" in few["reasons"][0]


def test_a_small_fall_that_could_be_large_is_inconclusive_not_a_no_go():
    old, new = [1] * 100, [1] * 97 + [0] * 3

    found = decide([("known-item queries", figures(old, new))], [], None, Rules())

    assert found["verdict"] == INCONCLUSIVE and "the fall could be as large as" in found["reasons"][0]


def test_a_slice_with_enough_queries_that_falls_is_a_no_go_even_when_the_whole_does_not():
    old = [1] * 400
    new = [0] * 60 + [1] * 340  # the first 60 queries are the guest's

    found = decide([("known-item queries", figures(old, new, lambda i: "GUEST" if i < 60 else "Chaffee"))], [], None,
                   Rules(tolerance=0.2))

    assert found["verdict"] == NO_GO and "in the slice speaker = GUEST" in found["reasons"][0]


def test_vectors_that_cannot_serve_a_search_and_a_latency_limit_are_no_go_whatever_the_queries_say():
    same = [1] * 300
    good = [("known-item queries", figures(same, same))]

    assert decide(good, ["the vectors are collapsed"], None, Rules())["reasons"] == ["the vectors are collapsed"]
    slow = decide(good, [], {"search_p95_ms": 80.0, "embed_p95_ms": 5.0, "ef_search": 100},
                  Rules(max_search_p95_ms=50))
    assert slow["verdict"] == NO_GO and "p95 is 80.0 ms at ef_search 100, over the limit of 50 ms" in slow["reasons"][0]


def test_health_finds_zero_collapsed_and_duplicated_vectors_and_passes_sound_ones():
    rng = np.random.default_rng(0)
    texts = [f"text number {i}" for i in range(200)]
    sound = rng.standard_normal((200, 64))
    collapsed = rng.standard_normal(64) + 0.01 * rng.standard_normal((200, 64))
    duplicated = sound.copy()
    duplicated[:20] = sound[0]
    zero = sound.copy()
    zero[5] = 0

    assert health.check(sound, texts, "segments.x")["problems"] == []
    assert "collapsed" in health.check(collapsed, texts, "segments.x")["problems"][0]
    assert "20 of 200 sampled vectors in segments.x are the same vector" in health.check(
        duplicated, texts, "segments.x")["problems"][0]
    assert health.check(zero, texts, "segments.x")["problems"][0].startswith("1 of 200 sampled vectors in segments.x "
                                                                            "are zero")
    same_text = health.check(np.vstack([sound[:1]] * 10 + [sound[1:100]]), ["the same words"] * 10 + texts[1:100], "x")
    assert same_text["duplicated"] == 0  # the same text twice rightly gets the same vector


def test_labelled_answers_are_ids_moments_and_youtube_links(tmp_path):
    path = tmp_path / "labelled.csv"
    path.write_text("question,answers\n"
                    "Does red meat raise LDL?,12 34\n"
                    "how long is keto adaptation,abcDEF12345@1:02:03\n"
                    "fasting and sleep,https://www.youtube.com/watch?v=abcDEF12345&t=95s https://youtu.be/XYZ?t=1m5s\n")

    found = queries.read_labelled(path)

    assert [q.answers.ids for q in found] == [frozenset({12, 34}), frozenset(), frozenset()]
    assert found[1].answers.moments == (("abcDEF12345", 3723.0, 3723.0),)
    assert found[2].answers.moments == (("abcDEF12345", 95.0, 95.0), ("XYZ", 65.0, 65.0))
    assert found[1].answers.answered_by((7, "abcDEF12345", 3715.0, 3716.0), window=10)
    assert not found[1].answers.answered_by((7, "abcDEF12345", 3700.0, 3710.0), window=10)


@pytest.mark.parametrize("content, problem", [
    ("question,answers\nwhy,\n", "entry 1 needs a question and at least one answer"),
    ("question,answers\nwhy,video-without-a-time\n", "video-without-a-time"),
    ("query\nwhy\n", "its first line names the columns query"),
])
def test_an_unreadable_labelled_file_names_the_problem_and_the_format(tmp_path, content, problem):
    path = tmp_path / "labelled.csv"
    path.write_text(content)

    with pytest.raises(queries.LabelledFileError) as error:
        queries.read_labelled(path)

    assert problem in str(error.value) and "question,answers" in str(error.value)


def test_each_question_of_a_batch_takes_the_time_to_its_last_hit_from_its_own_row():
    # (question, seconds since its row came out of unnest, id, video, start, end, distance), in the statement's order
    rows = [(1, 0.0011, 7, "v", 0.0, 5.0, 0.30), (1, 0.0012, 8, "v", 5.0, 9.0, 0.10),
            (1, 0.0013, 9, "w", 1.0, 2.0, 0.10), (2, 0.0040, None, None, None, None, None),  # no hit: its time kept
            (3, 0.0002, 4, "w", 0.0, 1.0, 0.20)]

    found = searching.per_question(rows, 3)

    assert [seconds for _, seconds in found] == [0.0013, 0.0040, 0.0002]
    assert [[hit[0] for hit in hits] for hits, _ in found] == [[8, 9, 7], [], [4]]  # by distance, ties as they came


def test_a_batch_is_sized_from_the_pace_so_far_well_within_the_statement_timeout():
    assert searching.batch_size(None, 30.0) == 1  # the pace is not known yet: one question
    assert searching.batch_size(0.0005, 30.0) == searching.MAX_BATCH
    assert searching.batch_size(0.1, 30.0) == 20  # BATCH_SECONDS of searching
    assert searching.batch_size(0.1, 2.0) == 5  # a quarter of a short statement timeout
    assert searching.batch_size(40.0, 30.0) == searching.batch_size(math.inf, 30.0) == 1


def test_a_spent_budget_sends_nothing_and_counts_the_searches_it_skipped():
    budget = searching.Budget(0)

    assert searching.search_all(None, budget, [[1.0, 0.0]] * 3, None) == [None, None, None]
    assert (budget.skipped, budget.timed_out) == (3, 0)
