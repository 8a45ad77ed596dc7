"""Tests of the accuracy ablation's comparison of arms against the seed noise
(castling_det/analysis/seed_noise.py): the pooled std, the standard error of a difference of
means, and the Markdown table of differences to reference arms."""
import math

import pytest

from castling_det.analysis.seed_noise import arm_difference, difference_markdown, pooled_seed_noise


def test_pooled_noise_weights_each_arm_by_its_degrees_of_freedom_and_skips_single_seeds():
    # Sample variances 1.0 (3 seeds: 2 dof) and 4.5 (2 seeds: 1 dof) -> (2 * 1.0 + 4.5) / 3.
    noise = pooled_seed_noise({"a": [1.0, 2.0, 3.0], "b": [10.0, 13.0], "c": [99.0]})
    assert noise.dof == 3
    assert noise.std == pytest.approx(math.sqrt(6.5 / 3))


def test_no_pooled_noise_without_an_arm_of_two_seeds():
    assert pooled_seed_noise({"a": [1.0], "b": [2.0]}) is None
    assert difference_markdown({"a": [1.0], "b": [2.0]}, ["a"]) == []


def test_difference_has_the_standard_error_of_two_means():
    noise = pooled_seed_noise({"a": [0.0, 2.0]})  # std sqrt(2)
    difference = arm_difference([5.0], [1.0, 2.0, 3.0], noise)
    assert difference.difference == pytest.approx(3.0)
    assert difference.standard_error == pytest.approx(math.sqrt(2) * math.sqrt(1 + 1 / 3))
    with pytest.raises(ValueError):
        arm_difference([], [1.0], noise)


def test_difference_table_has_a_row_per_arm_and_a_column_per_present_reference():
    ap = {"softmax": [56.5, 57.3], "window": [55.7], "castling": [57.5, 56.9]}
    lines = difference_markdown(ap, ["softmax", "window", "absent-arm"])
    assert lines[0].startswith("Seed noise, pooled over the arms with two seeds or more: std 0.50 AP per run (2 ")
    assert lines[2:4] == ["| arm | seeds (n) | − softmax | − window |", "|---|---|---|---|"]
    # castling − softmax: +0.3, se 0.50 * 1 = 0.5; window − softmax: −1.2, se 0.5 * sqrt(1.5) = 0.61.
    assert lines[4:] == [
        "| softmax | 2 | — | +1.2 ± 0.6 (+2.0 s.e.) |",
        "| window | 1 | −1.2 ± 0.6 (−2.0 s.e.) | — |",
        "| castling | 2 | +0.3 ± 0.5 (+0.6 s.e.) | +1.5 ± 0.6 (+2.4 s.e.) |",
    ]


def test_no_difference_table_without_a_reference_that_has_runs():
    assert difference_markdown({"a": [1.0, 2.0]}, ["softmax"]) == []
