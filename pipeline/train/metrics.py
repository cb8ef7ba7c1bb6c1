"""Class-balanced metrics and loss weights for imbalanced data (Ray-free, MLflow-free).

Everything derives from one confusion matrix (rows: true class, columns: predicted), which is a sum over
samples and so is all-reduced across ranks exactly like the loss sums: balanced accuracy (mean per-class
recall, the fine-tuning default for early stopping and model selection), per-class recall and precision,
and macro-F1. Classes absent from the evaluated split are left out of the means rather than counted as 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``cm[t, p]`` = samples of true class t predicted as p (int64, on the inputs' device)."""
    index = labels.to(torch.int64) * num_classes + predictions.to(torch.int64)
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(cm: torch.Tensor, classes: Sequence[str] | None = None) -> dict[str, float]:
    """``val/``-less names: balanced_acc, macro_f1, recall/<class>, precision/<class> from a confusion matrix.

    Recall of a class with no true samples and precision of a class never predicted are undefined; such
    classes are skipped in the means (and their entries are NaN), as scikit-learn's ``zero_division`` would
    otherwise bias the mean toward 0 or 1.
    """
    cm = cm.to(torch.float64).cpu()
    num_classes = cm.shape[0]
    names = list(classes) if classes is not None else [str(c) for c in range(num_classes)]
    true_counts, predicted_counts, hits = cm.sum(dim=1), cm.sum(dim=0), cm.diagonal()
    recall = torch.where(true_counts > 0, hits / true_counts.clamp(min=1), torch.nan)
    precision = torch.where(predicted_counts > 0, hits / predicted_counts.clamp(min=1), torch.nan)
    f1 = torch.where(
        (true_counts > 0),
        2 * hits / (true_counts + predicted_counts).clamp(min=1),
        torch.nan,
    )
    present = true_counts > 0
    metrics = {
        "balanced_acc": float(recall[present].mean()) if present.any() else float("nan"),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
    }
    for name, r, p in zip(names, recall.tolist(), precision.tolist(), strict=True):
        metrics[f"recall/{name}"] = r
        metrics[f"precision/{name}"] = p
    return metrics


def class_weights(
    counts: Sequence[int], mode: Literal["none", "inverse", "effective_number"], *, beta: float = 0.999
) -> torch.Tensor | None:
    """Cross-entropy weights per class from the training counts, or None for ``none``.

    * ``inverse``: n / (C * n_c), so a balanced dataset gets all ones and the expected weight per sample is 1.
    * ``effective_number`` (Cui et al. 2019): (1 - beta) / (1 - beta^n_c), normalized to sum to C; beta -> 0
      gives no reweighting, beta -> 1 approaches ``inverse``.
    """
    if mode == "none":
        return None
    n = torch.tensor(list(counts), dtype=torch.float64)
    if (n <= 0).any():
        raise ValueError(f"every class needs training samples to be weighted, got counts {list(counts)}")
    num_classes = len(n)
    if mode == "inverse":
        weights = n.sum() / (num_classes * n)
    elif mode == "effective_number":
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        weights = (1.0 - beta) / (1.0 - beta**n)
        weights = weights * num_classes / weights.sum()
    else:
        raise ValueError(f"unknown class weight mode {mode!r}")
    return weights.to(torch.float32)


def plot_confusion_matrix(cm: torch.Tensor, classes: Sequence[str], path: Path, *, title: str = "") -> Path:
    """Row-normalized confusion matrix (each row = one true class, so the diagonal is per-class recall)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = cm.to(torch.float64).cpu()
    rows = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(3.5, 0.6 * len(classes) + 1.5)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    for t in range(len(classes)):
        for p in range(len(classes)):
            value = rows[t, p].item()
            axis.text(
                p,
                t,
                f"{value:.2f}\n({int(counts[t, p])})",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if value > 0.5 else "black",
            )
    axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axis.set_yticks(range(len(classes)), classes)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title or "confusion matrix (rows normalized: recall on the diagonal)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
