"""Balanced metrics and class weights for imbalanced data."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.train.metrics import (
    class_weights,
    classification_metrics,
    confusion_matrix,
    plot_confusion_matrix,
)


def test_confusion_matrix_and_balanced_accuracy_on_an_imbalanced_split():
    # 90 samples of class 0 all right, 10 of class 1 all predicted as class 0: plain accuracy 0.9,
    # balanced accuracy 0.5 - the number that shows the minority class is never found.
    labels = torch.tensor([0] * 90 + [1] * 10)
    predictions = torch.zeros(100, dtype=torch.int64)
    cm = confusion_matrix(predictions, labels, 2)
    assert cm.tolist() == [[90, 0], [10, 0]]
    metrics = classification_metrics(cm, ["cat", "dog"])
    assert metrics["balanced_acc"] == pytest.approx(0.5)
    assert metrics["recall/cat"] == 1.0 and metrics["recall/dog"] == 0.0
    assert metrics["precision/cat"] == pytest.approx(0.9) and math.isnan(metrics["precision/dog"])
    # F1: cat 2*90/(90+100) = 0.947, dog 0 -> macro 0.474
    assert metrics["macro_f1"] == pytest.approx((180 / 190 + 0.0) / 2)


def test_metrics_match_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (500,), generator=generator)
    predictions = torch.where(
        torch.rand(500, generator=generator) < 0.6, labels, torch.randint(0, 4, (500,), generator=generator)
    )
    metrics = classification_metrics(confusion_matrix(predictions, labels, 4))
    recalls = [
        ((predictions == c) & (labels == c)).sum().item() / (labels == c).sum().item() for c in range(4)
    ]
    assert metrics["balanced_acc"] == pytest.approx(sum(recalls) / 4)


def test_absent_classes_are_left_out_of_the_means():
    cm = confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1]), 3)  # class 2 absent from the split
    metrics = classification_metrics(cm)
    assert metrics["balanced_acc"] == 1.0 and math.isnan(metrics["recall/2"])


def test_class_weights():
    counts = [200, 100, 20]
    assert class_weights(counts, "none") is None
    inverse = class_weights(counts, "inverse")
    assert inverse.tolist() == pytest.approx([320 / 600, 320 / 300, 320 / 60])
    # Expected weight per training sample is 1: the loss keeps its scale.
    assert float((inverse * torch.tensor(counts, dtype=torch.float32)).sum() / sum(counts)) == pytest.approx(
        1.0
    )
    effective = class_weights(counts, "effective_number", beta=0.99)
    assert float(effective.sum()) == pytest.approx(3.0)
    assert effective[2] > effective[1] > effective[0]
    nearly_none = class_weights(counts, "effective_number", beta=0.0)
    assert nearly_none.tolist() == pytest.approx([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="every class needs training samples"):
        class_weights([5, 0], "inverse")


def test_confusion_matrix_figure(tmp_path):
    cm = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3)
    path = plot_confusion_matrix(cm, ["a", "b", "c"], tmp_path / "cm.png")
    assert path.stat().st_size > 1000
