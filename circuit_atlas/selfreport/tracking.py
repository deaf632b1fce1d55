"""Weights & Biases logging of self-report runs, for users who have it: the ``wandb``
package installed and configured (an API key in ``WANDB_API_KEY`` or from ``wandb
login``, or ``WANDB_MODE`` set, e.g. ``offline``; ``WANDB_MODE=disabled`` turns it off,
``WANDB_PROJECT`` names the project, default "circuit-atlas"). Never required: without
it nothing is logged there, and the lake's tables hold the same metrics."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def configured() -> bool:
    """Whether wandb is installed and the user has set it up."""
    if importlib.util.find_spec("wandb") is None:
        return False
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class Tracker:
    """One run's epochs logged to W&B where :func:`configured`, else nothing."""

    def __init__(self, name: str, config: dict) -> None:
        self.run = None
        if configured():
            import wandb

            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "circuit-atlas"),
                                  name=name, config=config, job_type="self-report")

    def log(self, row: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if v is not None})

    def on_epoch(self, progress, step: str, total: int):
        """The training loops' per-epoch callback: the progress bar moved, the epoch's
        metrics logged."""
        def call(epoch: int, row: dict) -> None:
            if progress:
                progress.update(step, epoch + 1, total)
            self.log(row)
        return call

    def finish(self, summary: dict | None = None) -> None:
        if self.run is not None:
            if summary:
                self.run.summary.update(summary)
            self.run.finish()
            self.run = None
