"""The self-report stages' parameters (the CLI's options)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from circuit_atlas.errors import CircuitAtlasError


@dataclass(frozen=True)
class ScanParams:
    """Which neurons are worth reporting, from the activation statistics."""

    threshold: float = 0.5
    """A token is active for a neuron where |activation| reaches this share of the
    neuron's largest |activation|; selectivity is the share of tokens that are not."""
    min_count: int = 100
    """Neurons measured on fewer tokens are left out."""
    top: int = 0
    """Candidates kept per corpus (0: every neuron, ranked)."""

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise CircuitAtlasError("--threshold must lie between 0 and 1")
        if self.min_count < 1 or self.top < 0:
            raise CircuitAtlasError("--min-count must be at least 1 and --top at least 0")


@dataclass(frozen=True)
class DatasetParams:
    """Text windows of a corpus mapped to one neuron's activation at every token."""

    neuron: str | None = None
    """The neuron to report (L12/N345), or several for self-report transfer: a comma
    list (L12/N345,L3/N7), a whole layer (L12/*) or the scan's best N (top:N)."""
    context: int = 64
    """Tokens per window (texts are cut into consecutive windows of this length)."""
    val: float = 0.1
    """Share of the documents held out for validation (early stopping)."""
    test: float = 0.1
    """Share of the documents held out for the test (the evaluation)."""
    limit: int | None = None
    """Use only the first N texts of the corpus (by id)."""
    batch_tokens: int = 4096
    """Tokens per forward batch."""
    dtype: str = "auto"
    """Precision of the forward that reads the activations."""
    device: str = "cpu"
    """Where the forward runs."""

    def __post_init__(self) -> None:
        if not (0 <= self.val < 1 and 0 < self.test < 1 and self.val + self.test < 1):
            raise CircuitAtlasError("--val and --test are shares of the documents: "
                                    "0 <= val, 0 < test, val + test < 1")
        if self.context < 2 or self.batch_tokens < self.context:
            raise CircuitAtlasError("need --context >= 2 and --batch-tokens >= --context")


@dataclass(frozen=True)
class TrainParams:
    """A head trained to report the dataset's neuron, and the baselines."""

    neuron: str | None = None
    """The neuron whose dataset to train on (L12/N345; default: the only one)."""
    head: Literal["regression", "classification", "token"] = "regression"
    """regression: the activation itself (MSE); classification: its quantile bin among
    --bins (cross entropy), read back as the bin's mean activation; token: the model
    answers in text, the bin as a digit after a question at each window's last token
    (trains the model's last blocks: needs --unfreeze last:N)."""
    bins: int = 10
    """Quantile bins of the training activations (classification, and the accuracy and
    macro-F1 every method is scored by)."""
    read_layer: int = -1
    """The residual stream the head reads: after this many blocks (-1: the model's last
    hidden state, after its final norm)."""
    unfreeze: str = "head"
    """What trains: "head" (the model frozen: a probe trained by gradient descent),
    "last:N" (the head and the model's last N blocks) or "lora:R" (the head and
    rank-R low-rank adapters on every linear map of every block, the model's own
    weights frozen)."""
    epochs: int = 20
    """Passes over the training windows at most."""
    patience: int = 3
    """Epochs without a better validation loss before stopping."""
    lr: float = 1e-3
    """AdamW learning rate."""
    batch_windows: int = 16
    """Windows per training step."""
    seed: int = 0
    """Seed of the head's initialisation and the batch order."""
    device: str = "cpu"
    """Where training runs (float32)."""
    checkpoints: str | None = None
    """A local folder for a checkpoint after every epoch (head, trained blocks, optimiser
    and random state), so that --resume continues a run that stopped."""
    resume: bool = False
    """Continue from the checkpoint in --checkpoints (its configuration must match)."""
    plots: str | None = None
    """A folder for the run's plots: learning curves, and predicted against true
    activation on the test split (PNG)."""

    def __post_init__(self) -> None:
        if self.bins < 2 or (self.head == "token" and self.bins > 10):
            raise CircuitAtlasError("--bins must be at least 2 (at most 10 for the token "
                                    "head: one digit)")
        if self.head == "token" and (self.unfreeze == "head" or self.checkpoints):
            raise CircuitAtlasError("the token head trains the model itself to answer: use "
                                    "--unfreeze last:N or lora:R (and no --checkpoints "
                                    "yet)")
        if self.resume and not self.checkpoints:
            raise CircuitAtlasError("--resume needs --checkpoints FOLDER")
        kind, _, n = self.unfreeze.partition(":")
        if self.unfreeze != "head" and not (kind in ("last", "lora") and n.isdigit()
                                            and int(n) > 0):
            raise CircuitAtlasError(f"--unfreeze {self.unfreeze!r}: use head, last:N or "
                                    "lora:R")
        if self.epochs < 1 or self.patience < 1 or self.batch_windows < 1 or self.lr <= 0:
            raise CircuitAtlasError("--epochs, --patience, --batch-windows and --lr must "
                                    "be positive")

    @property
    def blocks(self) -> int:
        """Blocks of the model that train whole (last:N)."""
        return int(self.unfreeze[5:]) if self.unfreeze.startswith("last:") else 0

    @property
    def lora_rank(self) -> int:
        """The rank of the adapters (lora:R; 0: none)."""
        return int(self.unfreeze[5:]) if self.unfreeze.startswith("lora:") else 0

    @property
    def trains_model(self) -> bool:
        """Whether anything of the model trains (its features change as it does)."""
        return self.unfreeze != "head"


@dataclass(frozen=True)
class EvalParams:
    """A training run evaluated again from its checkpoint."""

    checkpoints: str | None = None
    """The run's checkpoint folder (self-report train --checkpoints)."""
    plots: str | None = None
    """A folder for the plots (as train --plots)."""
    device: str = "cpu"
    """Where the evaluation runs."""


@dataclass(frozen=True)
class TransferParams:
    """One head shared by the dataset's neurons, told which neuron to report, and
    scored on neurons it never trained on."""

    identity: Literal["weights", "embedding"] = "weights"
    """How the head is told the neuron: "weights", the neuron's own input weights (its
    gate and up rows through the norm before its MLP), which a neuron never trained on
    has too; "embedding", a vector learned per neuron (one head for many neurons, no
    transfer to new ones)."""
    held_out: str = "0.25"
    """Neurons of the dataset the head never trains on, scored on the test split: a
    share of them (drawn with --seed) or a comma list (L12/N345,L12/N7); 0 with
    --identity embedding."""
    read_layer: int = -1
    """The residual stream the head reads (as self-report train)."""
    width: int = 256
    """Width of the head's product features and hidden layer."""
    neurons_per_step: int = 64
    """Training neurons drawn for each step (all of them where fewer)."""
    epochs: int = 50
    """Passes over the training windows at most."""
    patience: int = 5
    """Epochs without a better validation loss before stopping."""
    lr: float = 1e-3
    """AdamW learning rate."""
    batch_windows: int = 16
    """Windows per training step."""
    seed: int = 0
    """Seed of the held-out draw, the head's initialisation and the batch order."""
    device: str = "cpu"
    """Where training runs (float32)."""
    plots: str | None = None
    """A folder for the learning curves and the per-neuron test R² (PNG)."""

    def __post_init__(self) -> None:
        share = _share(self.held_out)
        if share is not None and not 0 <= share < 1:
            raise CircuitAtlasError("--held-out: a share of the neurons in [0, 1), or a "
                                    "comma list of neurons")
        if self.identity == "embedding" and share != 0:
            raise CircuitAtlasError("--identity embedding learns a vector per trained "
                                    "neuron: it has none for a held-out one (--held-out 0)")
        if min(self.width, self.neurons_per_step, self.epochs, self.patience,
               self.batch_windows) < 1 or self.lr <= 0:
            raise CircuitAtlasError("--width, --neurons-per-step, --epochs, --patience, "
                                    "--batch-windows and --lr must be positive")

    @property
    def held_out_share(self) -> float | None:
        """The share asked for, or None where --held-out lists neurons."""
        return _share(self.held_out)


def _share(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
