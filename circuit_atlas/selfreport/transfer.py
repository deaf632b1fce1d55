"""One self-report head shared by many neurons, told which neuron to report, and
whether it transfers to neurons it never trained on.

The head reads the frozen model's residual stream ``h`` (as ``self-report train
--unfreeze head`` does) and a vector ``e`` naming the neuron, and outputs that neuron's
activation: ``MLP((P h) * (Q e))``, the product letting the neuron's vector pick which
directions of ``h`` matter (a bilinear read ``h' M e`` is one of its functions, and
``silu(g.h) (u.h)`` is approximately another). The vector ``e`` is either the
neuron's **own input weights** (its gate and up rows through the norm before its MLP:
what the model itself computes the neuron from, which a neuron never trained on has
too) or a vector **learned per neuron** (an id embedding: one head for many neurons,
which says nothing about a neuron it has not seen).

Neurons are split in two: the head trains on the *trained* neurons' training windows;
it is scored on the test documents of every neuron, the *held-out* ones included,
beside each neuron's own linear probe (ridge on the same residual, fit on that neuron's
own training labels: what an external reader reaches with labels) and its own training
mean; for a held-out neuron also beside the **nearest trained neuron's probe** (the
one whose input weights are most alike in cosine), the transfer one gets without
training a head. Early stopping watches the trained neurons' validation documents only,
so nothing of a held-out neuron's activations is seen before its test.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from circuit_atlas.compute.activations import Window
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.selfreport import evaluate as ev
from circuit_atlas.selfreport.params import TransferParams
from circuit_atlas.selfreport.tracking import Tracker
from circuit_atlas.selfreport.trainer import SPLITS, Epochs, Readout, features
from circuit_atlas.stage import Progress, Report, open_lake

CHUNK = 1024  # tokens per forward of the head outside training (bounds its memory)
VALIDATION_NEURONS = 128  # trained neurons whose validation loss decides early stopping


@dataclass
class Many:
    """One split's windows and every neuron's activation at each of their tokens."""

    windows: list[Window]
    targets: np.ndarray  # (tokens, neurons) float32, tokens in window order

    @classmethod
    def of(cls, table: pl.DataFrame, neurons: list[tuple[int, int]]) -> Many:
        """From the dataset rows of one split (one row per neuron and window)."""
        wanted = pl.DataFrame({"layer": [n[0] for n in neurons],
                               "neuron": [n[1] for n in neurons]},
                              schema={"layer": pl.Int16, "neuron": pl.Int32})
        rows = table.join(wanted, on=["layer", "neuron"], how="semi").sort(
            "layer", "neuron", "window_id")
        first = rows.filter((pl.col("layer") == neurons[0][0])
                            & (pl.col("neuron") == neurons[0][1]))
        windows = [Window(w, d, s, tuple(t)) for w, d, s, t in first.select(
            "window_id", "prompt_id", "start", "token_ids").iter_rows()]
        ids = rows["window_id"].to_numpy()
        if len(ids) != len(windows) * len(neurons) or not (
                ids.reshape(len(neurons), -1) == first["window_id"].to_numpy()).all():
            raise CircuitAtlasError("the dataset's neurons are not over the same "
                                    "windows: cut it again with one self-report dataset")
        flat = rows["activations"].explode().to_numpy().astype(np.float32)
        return cls(windows, np.ascontiguousarray(flat.reshape(len(neurons), -1).T))


def identity_vectors(adapter, neurons: list[tuple[int, int]]) -> np.ndarray:
    """(neurons, 2d) each neuron's gate and up rows times the weight of the norm in
    front of its MLP (1 where the family has none there), scaled together to unit RMS."""
    rows = []
    for layer, neuron in neurons:
        blk = adapter.blocks[layer]
        norm = (blk.mlp_norm.float() if blk.mlp_norm is not None else
                torch.ones(blk.gate.shape[1]))
        rows.append(torch.cat([blk.gate[neuron].float() * norm,
                               blk.up[neuron].float() * norm]).cpu().numpy())
    out = np.stack(rows).astype(np.float64)
    return (out / np.sqrt((out ** 2).mean())).astype(np.float32)


class ConditionedHead(torch.nn.Module):
    """``MLP((P h) * (Q e))``: (tokens, d) and (neurons, e) in, (tokens, neurons) out;
    ``embeddings`` > 0: ``e`` is a learned row per neuron (given as indices)."""

    def __init__(self, d: int, e_dim: int, width: int, embeddings: int = 0) -> None:
        super().__init__()
        self.read = torch.nn.Linear(d, width)
        self.cond = torch.nn.Linear(e_dim if not embeddings else width, width)
        self.out = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(),
                                       torch.nn.Linear(width, 1))
        self.table = (torch.nn.Parameter(torch.randn(embeddings, width) / width ** 0.5)
                      if embeddings else None)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        if self.table is not None:
            e = self.table[e]
        return self.out(self.read(h)[:, None, :] * self.cond(e)[None, :, :])[..., 0]


def held_out_neurons(neurons: list[tuple[int, int]], params: TransferParams
                     ) -> list[tuple[int, int]]:
    """The neurons the head never trains on: a seeded draw of the share asked, or the
    list given (each must be in the dataset)."""
    from circuit_atlas.lake.neurons import neuron_label, parse_neuron

    share = params.held_out_share
    if share is None:
        named = sorted({parse_neuron(p.strip()) for p in params.held_out.split(",")
                        if p.strip()})
        missing = [neuron_label(*n) for n in named if n not in neurons]
        if missing:
            raise CircuitAtlasError(f"--held-out {', '.join(missing)}: not in the dataset")
        return named
    k = int(round(share * len(neurons)))
    pick = np.random.default_rng(params.seed).permutation(len(neurons))[:k]
    return sorted(neurons[i] for i in pick)


def train_transfer(frozen: dict[str, np.ndarray], data: dict[str, Many],
                   identity: np.ndarray | None, trained: np.ndarray,
                   params: TransferParams, on_epoch=None
                   ) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Train the shared head on the ``trained`` neurons (column indices) of the training
    windows; returns its predictions of every neuron on the validation and test splits
    (activation units) and one metrics row per epoch (the validation loss over a fixed
    draw of up to ``VALIDATION_NEURONS`` trained neurons)."""
    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    device = torch.device(params.device)
    mu, sd = frozen["train"].mean(0), frozen["train"].std(0) + 1e-6
    x = {s: torch.as_tensor((frozen[s] - mu) / sd, dtype=torch.float32) for s in SPLITS}
    train_y = data["train"].targets[:, trained]
    centre, scale = float(train_y.mean()), float(train_y.std()) or 1.0
    k = data["train"].targets.shape[1]
    if identity is None:
        head = ConditionedHead(x["train"].shape[1], 0, params.width, embeddings=k)
        names = torch.arange(k)
    else:
        head = ConditionedHead(x["train"].shape[1], identity.shape[1], params.width)
        names = torch.as_tensor(identity)
    head = head.to(device)
    names = names.to(device)
    optim = torch.optim.AdamW(head.parameters(), lr=params.lr)

    def predict(split: str, cols: np.ndarray) -> np.ndarray:
        out = []
        with torch.no_grad():
            for lo in range(0, len(x[split]), CHUNK):
                out.append(head(x[split][lo:lo + CHUNK].to(device),
                                names[torch.as_tensor(cols, device=device)]).cpu().numpy())
        return (np.concatenate(out) if out else np.zeros((0, len(cols)), np.float32)
                ) * scale + centre

    lengths = [len(w.tokens) for w in data["train"].windows]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    y = torch.as_tensor((data["train"].targets - centre) / scale, dtype=torch.float32)
    epochs = Epochs(params.patience)
    val = "val" if len(data["val"].targets) else "train"
    # the validation loss over a fixed draw of trained neurons: the head's cost grows
    # with tokens x neurons, and all of them each epoch would outweigh the training
    watched = np.sort(rng.choice(trained, size=min(VALIDATION_NEURONS, len(trained)),
                                 replace=False))
    for epoch in range(params.epochs):
        t0 = time.perf_counter()
        order = rng.permutation(len(lengths))
        losses = []
        for lo in range(0, len(order), params.batch_windows):
            rows = np.concatenate([np.arange(offsets[i], offsets[i + 1])
                                   for i in order[lo:lo + params.batch_windows]])
            cols = rng.choice(trained, size=min(params.neurons_per_step, len(trained)),
                              replace=False)
            got = head(x["train"][rows].to(device), names[torch.as_tensor(cols,
                                                                          device=device)])
            loss = torch.nn.functional.mse_loss(
                got, y[rows][:, cols].to(device))
            optim.zero_grad()
            loss.backward()
            optim.step()
            losses.append(float(loss.detach()))
        pred = predict(val, watched)
        truth = data[val].targets[:, watched]
        val_loss = float((((pred - truth) / scale) ** 2).mean())
        epochs.end(epoch, losses, val_loss, ev.r2(truth.ravel(), pred.ravel()), t0,
                   len(lengths), lambda: {n: v.detach().clone()
                                          for n, v in head.state_dict().items()})
        if on_epoch:
            on_epoch(epoch, epochs.rows[-1])
        if epochs.done:
            break
    head.load_state_dict(epochs.best_state)
    every = np.arange(k)
    return {s: predict(s, every) for s in ("val", "test")}, epochs.rows


def nearest_trained(identity: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """For every neuron, the trained neuron (column index) whose identity vector is the
    most alike in cosine, itself excluded."""
    unit = identity / np.linalg.norm(identity, axis=1, keepdims=True).clip(1e-12)
    sim = unit @ unit[trained].T
    sim[trained, np.arange(len(trained))] = -np.inf
    return trained[sim.argmax(1)]


@dataclass
class TransferReport(Report):
    corpus: str
    identity: str
    trained: int
    held_out: int
    epochs: int
    medians: dict[str, dict[str, float]]  # role -> method -> median test R²

    def __str__(self) -> str:
        parts = "; ".join(f"{role}: " + ", ".join(f"{m} {r:+.3f}" for m, r in methods.items())
                          for role, methods in self.medians.items())
        return (f"self-report transfer {self.corpus} ({self.identity}, {self.trained} "
                f"trained, {self.held_out} held out, {self.epochs} epochs): median test R² "
                f"{parts}")


def run_transfer(lake, *, model, corpora=None, params: TransferParams | None = None,
                 cluster=None, progress: Progress | None = None) -> TransferReport:
    """Train one head conditioned on the neuron over a several-neuron
    ``selfreport_dataset``; score it on every neuron's test split, held-out neurons
    included, beside the baselines; write ``selfreport_transfer``."""
    from circuit_atlas.compute.models import load_model
    from circuit_atlas.lake.neurons import neuron_label
    from circuit_atlas.lake.schemas import SELFREPORT_TRANSFER
    from circuit_atlas.selfreport.dataset import read_dataset
    from circuit_atlas.selfreport.trainer import publish_run

    lake, params = open_lake(lake), params or TransferParams()
    corpus, table, neurons = read_dataset(lake, model, corpora, "L12/*")
    if len(neurons) < 2:
        raise CircuitAtlasError("transfer needs a dataset of several neurons: self-report "
                                "dataset --neuron L12/* (or a comma list, or top:N)")
    held = set(held_out_neurons(neurons, params))
    trained = np.array([i for i, n in enumerate(neurons) if n not in held])
    if not len(trained):
        raise CircuitAtlasError("every neuron is held out: none is left to train on")
    data = {s: Many.of(table.filter(pl.col("split") == s), neurons) for s in SPLITS}
    if not len(data["train"].targets) or not len(data["test"].targets):
        raise CircuitAtlasError("the dataset needs training and test windows (more texts, or "
                                "a larger --test share)")
    loaded = load_model(model, device=params.device, dtype="float32", stage="selfreport")
    if progress:
        progress.update("self-report transfer", 0, params.epochs)
    frozen = {s: features(loaded, data[s].windows, params.read_layer) for s in SPLITS}
    identity = (identity_vectors(loaded.adapter, neurons) if params.identity == "weights"
                else None)
    config = {**{k: getattr(params, k) for k in params.__dataclass_fields__},
              "model": loaded.name, "revision": loaded.revision,
              "held_out_neurons": [neuron_label(*n) for n in sorted(held)]}
    tracker = Tracker(f"transfer {params.identity}", config)
    on_epoch = tracker.on_epoch(progress, "self-report transfer", params.epochs)

    try:
        preds, metrics = train_transfer(frozen, data, identity, trained, params, on_epoch)
    except BaseException:
        tracker.finish()
        raise
    probes, _ = ev.fit_ridges({s: (frozen[s], data[s].targets) for s in SPLITS})
    nearest = nearest_trained(identity, trained) if identity is not None else None
    rows = []
    for k, (layer, neuron) in enumerate(neurons):
        train_k = data["train"].targets[:, k]
        bins = Readout("classification", train_k, 10)
        role = "held out" if (layer, neuron) in held else "trained"
        methods = {"self-report": {s: preds[s][:, k] for s in ("val", "test")},
                   "linear probe": {s: probes[s][:, k] for s in SPLITS},
                   "mean": {s: np.full(len(data[s].targets), train_k.mean()) for s in SPLITS}}
        if role == "held out" and nearest is not None:
            methods["nearest neuron"] = {s: probes[s][:, nearest[k]] for s in SPLITS}
        for method, p in methods.items():
            for s in ("val", "test"):
                if len(data[s].targets):
                    rows.append({"layer": layer, "neuron": neuron, "role": role,
                                 "identity": params.identity, "method": method, "split": s,
                                 **ev.scores(data[s].targets[:, k], p[s], bins.edges,
                                             bins.centers)})
    frame = pl.DataFrame(rows).drop("parse_rate")
    publish_run(lake, loaded.name, corpus, SELFREPORT_TRANSFER, frame,
                {**config, "learning": metrics},
                key=params.identity, same=pl.col("identity") == params.identity)
    test = frame.filter(pl.col("split") == "test")
    medians = {role: dict(test.filter(pl.col("role") == role).group_by(
        "method", maintain_order=True).agg(pl.col("r2").median()).rows())
        for role in ("trained", "held out") if (test["role"] == role).any()}
    tracker.finish({f"median_test_r2/{role}/{m}": r for role, methods in medians.items()
                    for m, r in methods.items()})
    if params.plots:
        from circuit_atlas.selfreport.plots import write_transfer_plots

        write_transfer_plots(params.plots, f"transfer ({params.identity})", metrics, test)
    return TransferReport(corpus, params.identity, len(trained), len(held), len(metrics),
                          medians)
