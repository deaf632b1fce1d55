"""The numbers a label scorer reports, on plain arrays: balanced accuracy, F1, AUC and
Pearson's r, each defined where its input is degenerate (a single class, a constant)
as None rather than a misleading 0 or 1."""

from __future__ import annotations

import numpy as np


def balanced_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float | None:
    """Mean of the recall on positives and on negatives (0.5: chance, whatever the mix)."""
    truth, predicted = np.asarray(truth, bool), np.asarray(predicted, bool)
    if truth.all() or not truth.any():
        return None
    return float((predicted[truth].mean() + (~predicted[~truth]).mean()) / 2)


def f1(truth: np.ndarray, predicted: np.ndarray) -> float | None:
    """F1 of the positive class; None when there is no positive in either."""
    truth, predicted = np.asarray(truth, bool), np.asarray(predicted, bool)
    tp = int((truth & predicted).sum())
    denom = int(truth.sum() + predicted.sum())
    return None if denom == 0 else 2 * tp / denom


def auc(truth: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve of ``score`` for ``truth``: the chance that a random
    positive scores above a random negative, ties counted half (Mann-Whitney U)."""
    truth, score = np.asarray(truth, bool), np.asarray(score, float)
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2 + 1
    ranks[order] = np.repeat(avg, counts)
    u = ranks[truth].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def accuracy(truth: np.ndarray, predicted: np.ndarray) -> float | None:
    truth, predicted = np.asarray(truth, bool), np.asarray(predicted, bool)
    return None if len(truth) == 0 else float((truth == predicted).mean())


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r; None when either side is constant (a simulation that predicts the
    same value everywhere explains nothing, and says so)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / np.sqrt((x @ x) * (y @ y)))
