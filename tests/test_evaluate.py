import math

import numpy as np
import pytest

from peftlab.metrics import compute_metrics


def test_metrics_match_hand_computation():
    # preds: [0, 1, 1, 0, 1]; labels: [0, 1, 0, 0, 1]
    logits = np.array([[2, 0], [0, 1], [0, 3], [1, 0], [0, 2]], dtype=np.float32)
    m = compute_metrics(logits, [0, 1, 0, 0, 1], ["a", "b"])
    assert m["accuracy"] == pytest.approx(0.8)
    # class a: tp 2, fp 0, fn 1 -> P 1, R 2/3, F1 0.8; class b: tp 2, fp 1, fn 0 -> P 2/3, R 1, F1 0.8
    assert m["per_class"]["a"]["precision"] == pytest.approx(1.0)
    assert m["per_class"]["a"]["recall"] == pytest.approx(2 / 3)
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx(0.8)
    assert m["confusion_matrix"] == [[2, 1], [0, 2]]
    expected_loss = np.mean(
        [
            math.log1p(math.exp(-2)),
            math.log1p(math.exp(-1)),
            math.log1p(math.exp(3)),
            math.log1p(math.exp(-1)),
            math.log1p(math.exp(-2)),
        ]
    )
    assert m["loss"] == pytest.approx(expected_loss)


def test_class_never_predicted_has_zero_precision_not_nan():
    m = compute_metrics(np.array([[1.0, 0.0], [1.0, 0.0]]), [0, 1], ["a", "b"])
    assert m["per_class"]["b"]["precision"] == 0.0 and m["macro_f1"] == pytest.approx((2 / 3) / 2)


def test_macro_f1_is_taken_over_the_classes_present_in_the_labels():
    # preds: [0, 0, 1, 1]; labels: [0, 1, 1, 1]; class c has no example and is never predicted.
    logits = np.array([[2, 0, 0], [2, 0, 0], [0, 2, 0], [0, 2, 0]], dtype=np.float32)
    m = compute_metrics(logits, [0, 1, 1, 1], ["a", "b", "c"])
    # a: P 1/2, R 1, F1 2/3; b: P 1, R 2/3, F1 4/5; c: undefined, so left out rather than counted as 0.
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert m["macro_f1_over"] == "classes present in the evaluated labels (2 of 3)"
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
