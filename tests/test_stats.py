"""Confidence intervals and spreads on hand-worked cases."""

import numpy as np
import pytest

from hificl.stats import spread


def test_a_constant_score_has_no_spread():
    result = spread([[0.5] * 10, [0.5] * 10, [0.5] * 10])
    assert result.mean == 0.5 and result.std == 0.0 and result.replicates == 3
    assert result.ci_questions == (0.5, 0.5) and result.ci_questions_and_seeds == (0.5, 0.5)


def test_two_questions_give_the_whole_range():
    """One replicate scoring [0, 1]: a resample of two questions has mean 0, 1/2 or 1 with probabilities 1/4, 1/2,
    1/4, so its 2.5th and 97.5th percentiles are 0 and 1."""
    result = spread([[0.0, 1.0]])
    assert result.mean == 0.5 and result.std == 0.0 and result.ci_questions == (0.0, 1.0)


def test_seeds_matter_only_in_the_interval_that_resamples_them():
    """Replicates scoring all 1 and all 0: resampling questions alone keeps the mean at 1/2; resampling the two
    replicates gives 0, 1/2 or 1 (probabilities 1/4, 1/2, 1/4)."""
    result = spread([[1.0] * 5, [0.0] * 5])
    assert result.mean == 0.5 and result.std == pytest.approx(np.sqrt(0.5))  # sample std of (1, 0)
    assert result.ci_questions == (0.5, 0.5) and result.ci_questions_and_seeds == (0.0, 1.0)


def test_the_question_interval_matches_the_normal_approximation():
    """1000 questions, half right: the 95% interval of the mean is about +-1.96 * sqrt(0.25 / 1000) = +-0.031."""
    scores = [[1.0, 0.0] * 500]
    low, high = spread(scores, resamples=4000).ci_questions
    assert low == pytest.approx(0.5 - 0.031, abs=0.006) and high == pytest.approx(0.5 + 0.031, abs=0.006)


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="non-empty"):
        spread([])
    with pytest.raises(ValueError, match="non-finite"):
        spread([[float("nan")]])


def test_the_paired_difference_of_two_methods_pairs_questions_and_seeds():
    import runpy
    from pathlib import Path

    difference = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "paired_difference.py"))["difference"]
    a = {1: [1, 0, 1, 1], 2: [0, 0, 1, 1]}
    b = {1: [1, 0, 0, 1], 2: [0, 1, 1, 0]}
    rows = ([{"method": "A", "seed": s, "per_question": q, "selection": "last epoch"} for s, q in a.items()]
            + [{"method": "A", "seed": 1, "per_question": [0, 0, 0, 0], "selection": "selected on validation"}]
            + [{"method": "B", "seed": s, "per_question": q} for s, q in b.items()]
            + [{"method": "Z", "seed": 1, "per_question": [1, 1, 0, 0]}])  # measured once, under the first seed
    results = {"replicates": rows}
    found = difference(results, "A", "B")
    assert found.replicates == 2 and found.mean == pytest.approx((0.25 + 0) / 2), "the last epoch's rows are paired"
    assert found.std == pytest.approx(np.std([0.25, 0], ddof=1))
    assert found.ci_questions[0] <= found.mean <= found.ci_questions[1]
    same = difference(results, "A", "A")
    assert same.mean == 0 and same.ci_questions == (0.0, 0.0), "a method against itself differs by nothing"
    once = difference(results, "A", "Z")  # zero-shot, measured once, pairs with every seed
    assert once.replicates == 2 and once.mean == pytest.approx((0.25 + 0) / 2)
    with pytest.raises(SystemExit, match="no method labelled 'C'.*'A', 'B', 'Z'"):
        difference(results, "C", "A")
