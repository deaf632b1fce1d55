"""How well a neuron's activation is reported, and the honest baselines on the same
split: a **linear probe** (ridge regression on the same layer's residual stream of the
frozen model: the external reader a self-report must be compared with), a **bag of
tokens** (ridge on the current token and the counts of the tokens before it, hashed
into buckets: what the text alone says, with no model), and the **mean** (the training
split's mean activation). Each ridge picks its penalty on the validation split.
"""

from __future__ import annotations

import numpy as np

BUCKETS = 1024  # hashed token buckets of the bag-of-tokens baseline, per part
PENALTIES = tuple(10.0 ** k for k in range(-4, 4))


def r2(y: np.ndarray, p: np.ndarray) -> float:
    """1 - residual / total sum of squares (0: the mean of y itself; below 0: worse)."""
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    total = ((y - y.mean()) ** 2).sum()
    return float(1 - ((y - p) ** 2).sum() / total) if total > 0 else float("nan")


def pearson(y: np.ndarray, p: np.ndarray) -> float:
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    if y.std() == 0 or p.std() == 0:
        return float("nan")
    return float(np.corrcoef(y, p)[0, 1])


def fit_ridge(splits: dict[str, tuple[np.ndarray, np.ndarray]]
              ) -> tuple[dict[str, np.ndarray], float]:
    """Predictions on every split of a ridge fit on "train", its penalty chosen by R² on
    "val" (on "train" when there is no validation split); and that penalty."""
    preds, penalties = fit_ridges({s: (x, y[:, None]) for s, (x, y) in splits.items()})
    return {s: p[:, 0] for s, p in preds.items()}, float(penalties[0])


def fit_ridges(splits: dict[str, tuple[np.ndarray, np.ndarray]]
               ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """:func:`fit_ridge` for many targets on the same features at once (``y`` of shape
    (rows, targets)), each target's penalty chosen on its own: one eigendecomposition of
    the training features' Gram matrix serves every penalty and every target."""
    x, y = (np.asarray(a, np.float64) for a in splits["train"])
    pick = "val" if len(splits.get("val", ((), ()))[1]) else "train"
    mx, my = x.mean(0), y.mean(0)
    xc = x - mx
    vals, vecs = np.linalg.eigh(xc.T @ xc)
    proj = vecs.T @ (xc.T @ (y - my))  # (features, targets) in the eigenbasis
    xv, yv = np.asarray(splits[pick][0], np.float64), np.asarray(splits[pick][1], np.float64)
    total = ((yv - yv.mean(0)) ** 2).sum(0)
    best, weights = np.full(y.shape[1], -np.inf), np.zeros((x.shape[1], y.shape[1]))
    chosen = np.zeros(y.shape[1])
    for penalty in PENALTIES:
        w = vecs @ (proj / (np.maximum(vals, 0) + penalty * len(x))[:, None])
        resid = ((yv - ((xv - mx) @ w + my)) ** 2).sum(0)
        score = np.where(total > 0, 1 - resid / np.where(total > 0, total, 1), -resid)
        better = score > best
        best[better], chosen[better], weights[:, better] = score[better], penalty, w[:, better]
    return {s: (np.asarray(xs, np.float64) - mx) @ weights + my
            for s, (xs, _) in splits.items()}, chosen


def bag_of_tokens(token_ids: list[np.ndarray]) -> np.ndarray:
    """(tokens, 2 * BUCKETS) features per token of each window: its own token, one-hot,
    and the tokens before it in the window as counts over their position, both hashed."""
    rows = []
    for ids in token_ids:
        ids = np.asarray(ids, np.int64) % BUCKETS
        current = np.zeros((len(ids), BUCKETS))
        current[np.arange(len(ids)), ids] = 1
        before = np.cumsum(current, 0) - current
        before /= np.maximum(np.arange(len(ids)), 1)[:, None]
        rows.append(np.concatenate([current, before], 1))
    return np.concatenate(rows) if rows else np.zeros((0, 2 * BUCKETS))


def macro_f1(true: np.ndarray, pred: np.ndarray) -> float:
    """The mean over the classes present in ``true`` of each class's F1."""
    f1 = []
    for k in np.unique(true):
        tp = float(((pred == k) & (true == k)).sum())
        p, t = float((pred == k).sum()), float((true == k).sum())
        f1.append(2 * tp / (p + t) if p + t else 0.0)
    return float(np.mean(f1)) if f1 else float("nan")


def scores(y: np.ndarray, p: np.ndarray, edges: np.ndarray, centers: np.ndarray
           ) -> dict[str, float]:
    """R² and Pearson of predictions ``p`` of activations ``y``, and the accuracy and
    macro-F1 of their quantile bins: the true bin by the training split's ``edges``, the
    predicted one the bin whose mean training activation (``centers``) is nearest (so
    that a prediction of 0.01 for a neuron at exactly 0 is "quiet", not the bin above
    0). A prediction that is NaN is an answer that did not parse (the token head): R²
    and Pearson are over the parsed ones, ``parse_rate`` says how many, and an unparsed
    answer is a wrong bin."""
    ok = np.isfinite(p)
    true = np.searchsorted(edges, y)
    gap = np.abs(np.where(ok, p, 0)[:, None] - centers[None, :])
    gap[:, ~np.isfinite(centers)] = np.inf
    pred = np.where(ok, gap.argmin(1) if len(p) else np.zeros(0, np.int64), -1)
    return {"r2": r2(y[ok], p[ok]) if ok.any() else float("nan"),
            "pearson": pearson(y[ok], p[ok]) if ok.any() else float("nan"),
            "accuracy": float((true == pred).mean()), "macro_f1": macro_f1(true, pred),
            "parse_rate": float(ok.mean()) if len(ok) else float("nan"),
            "tokens": int(len(y))}
