"""Evaluate: scores computed from predictions, checked against hand-worked values."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.evaluate import confusion_summary, score_predictions


def test_scores_match_hand_computed_values():
    labels = np.array([0, 0, 1, 1, 2])
    probabilities = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    scores = score_predictions(probabilities, labels, ["a", "b", "c"])
    assert scores.accuracy == pytest.approx(3 / 5)
    assert scores.crossentropy == pytest.approx(-np.mean(np.log([0.8, 0.2, 0.8, 0.6, 0.3])))
    assert scores.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    by_class = scores.per_class.set_index("class")
    assert by_class.loc["a", "precision"] == pytest.approx(0.5)
    assert by_class.loc["b", "precision"] == pytest.approx(2 / 3)
    assert by_class.loc["b", "recall"] == pytest.approx(1.0)
    assert by_class.loc["b", "f1"] == pytest.approx(0.8)
    assert by_class.loc["c", "f1"] == 0.0  # never predicted: no division by zero
    assert confusion_summary(scores.confusion, ["a", "b", "c"])["c"] == {"a": 1, "b": 0, "c": 0}


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match=r"expected \(2, 3\)"):
        score_predictions(np.ones((2, 4)) / 4, np.array([0, 1]), ["a", "b", "c"])


def test_cpu_description_keeps_the_model_and_the_flags_that_pick_kernels():
    from tasks.evaluate import cpu_description

    cpuinfo = (
        "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma bmi2 sha_ni\n\nprocessor\t: 1\n"
    )
    assert cpu_description(cpuinfo) == ("AMD EPYC 7B13", "avx avx2 fma")
