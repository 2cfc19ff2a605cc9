"""Rank-biased overlap (segments.compare.rbo), extrapolated, p = 0.9, on examples checked by hand."""
import pytest

from segments.compare import rbo


def test_identical_lists_agree_fully():
    assert rbo([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]) == pytest.approx(1.0)
    assert rbo(["a"], ["a"]) == pytest.approx(1.0)


def test_lists_without_a_common_item_do_not_agree_at_all():
    assert rbo("abcde", "fghij") == 0.0
    assert rbo("ab", "cdefg") == 0.0


def test_a_list_that_begins_the_other_agrees_fully_either_way():
    # The shorter list is taken to go on as it began: nothing contradicts the longer one.
    assert rbo("abcde", "abcdefg") == pytest.approx(1.0)
    assert rbo("abcdefg", "abcde") == pytest.approx(1.0)


def test_a_published_value():
    # The worked example of the RBO_ext implementations after Webber et al. (rankmeasures' README:
    # RBO.eval(List(1,2,3,4,5), List(2,3,4,1,5), 0.9) = 0.828). By hand: the agreements at depths
    # 1..5 are 0, 1/2, 2/3, 1, 1; (1-p)/p * sum(A_d p^d) + A_5 p^5 = 0.2375 + 0.5905.
    assert rbo([1, 2, 3, 4, 5], [2, 3, 4, 1, 5]) == pytest.approx(0.828, abs=5e-4)


def test_lists_of_different_lengths_by_hand():
    # s = 2, l = 3: X_1 = 0, X_2 = 1, X_3 = 1 (the short list whole against the long one's top 3).
    # (1-p)/p * (1/2 p^2 + 1/3 p^3 + X_2 (3-2)/(2*3) p^3) + ((X_3 - X_2)/3 + X_2/2) p^3
    p = 0.9
    expected = (1 - p) / p * (p**2 / 2 + p**3 / 3 + p**3 / 6) + p**3 / 2
    assert rbo("ab", "bcd") == pytest.approx(expected)
    assert rbo("bcd", "ab") == pytest.approx(expected)
    assert expected == pytest.approx(0.45)


def test_the_top_ranks_weigh_most():
    swapped_top, swapped_bottom = rbo("abcdefghij", "bacdefghij"), rbo("abcdefghij", "abcdefghji")
    assert swapped_top < swapped_bottom < 1.0
    # One shared segment counts for more at rank 1 than at rank 10.
    assert rbo("abcdefghij", "aklmnopqrs") > rbo("bcdefghija", "klmnopqrsa") > 0


def test_edge_cases():
    assert rbo([], []) is None  # nothing to compare
    assert rbo([], [1, 2]) == 0.0
    with pytest.raises(ValueError):
        rbo([1], [1], p=1.0)
