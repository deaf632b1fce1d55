"""A self-report run's plots: the learning curves, and predicted against true
activation on the test split for the trained model and each baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_plot(folder: Path, label: str, metrics: list[dict]) -> str:
    """``learning.png``: training and validation loss, and validation R², per epoch."""
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    epochs = [m["epoch"] for m in metrics]
    fig, (loss, r2) = plt.subplots(1, 2, figsize=(8, 3.2))
    loss.plot(epochs, [m["train_loss"] for m in metrics], marker="o", ms=3, label="train")
    loss.plot(epochs, [m["val_loss"] for m in metrics], marker="o", ms=3, label="validation")
    loss.set_xlabel("epoch")
    loss.set_ylabel("loss")
    loss.legend(fontsize=8)
    r2.plot(epochs, [m["val_r2"] for m in metrics], marker="o", ms=3, color="#55a868")
    r2.set_xlabel("epoch")
    r2.set_ylabel("validation R²")
    fig.suptitle(f"{label}: learning curves")
    fig.tight_layout()
    path = str(folder / "learning.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(out: str, label: str, metrics: list[dict], test: np.ndarray,
                predictions: dict[str, np.ndarray]) -> list[str]:
    """``learning.png`` and ``predicted.png`` under ``out``; their paths."""
    plt, folder = _pyplot(), Path(out)
    paths = [learning_plot(folder, label, metrics)]
    fig, axes = plt.subplots(1, len(predictions), figsize=(3.2 * len(predictions), 3.2),
                             squeeze=False, sharey=True)
    lo, hi = float(test.min()), float(test.max())
    for ax, (method, pred) in zip(axes[0], predictions.items(), strict=True):
        ax.scatter(test, pred, s=4, alpha=0.5)
        ax.plot([lo, hi], [lo, hi], color="#c44e52", lw=1, ls="--")
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("true activation")
    axes[0][0].set_ylabel("predicted")
    fig.suptitle(f"{label}: the test split")
    fig.tight_layout()
    paths.append(str(folder / "predicted.png"))
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def write_transfer_plots(out: str, label: str, metrics: list[dict], test) -> list[str]:
    """``learning.png`` and ``neurons.png`` (each neuron's test R² with the shared head
    against its own linear probe's, trained and held-out neurons apart) under ``out``."""
    plt, folder = _pyplot(), Path(out)
    paths = [learning_plot(folder, label, metrics)]
    r2 = {(r["layer"], r["neuron"], r["method"]): (r["r2"], r["role"])
          for r in test.iter_rows(named=True)}
    fig, ax = plt.subplots(figsize=(4.2, 4))
    for role, colour in (("trained", "#4c72b0"), ("held out", "#dd8452")):
        pts = [(r2[(layer, n, "linear probe")][0], value) for (layer, n, m), (value, rl)
               in r2.items() if m == "self-report" and rl == role]
        if pts:
            ax.scatter(*zip(*pts, strict=True), s=12, alpha=0.7, color=colour, label=role)
    ax.plot([0, 1], [0, 1], color="#c44e52", lw=1, ls="--")
    ax.set_xlabel("test R², the neuron's own linear probe")
    ax.set_ylabel("test R², the shared head")
    ax.legend(fontsize=8)
    ax.set_title(f"{label}: per neuron", fontsize=10)
    fig.tight_layout()
    paths.append(str(folder / "neurons.png"))
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths
