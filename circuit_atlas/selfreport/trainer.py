"""Training a model to report one of its own neurons.

The predictor is the model itself reading its residual stream after ``read_layer``
blocks (default: its last hidden state), with a linear head that outputs the neuron's
activation (:class:`Readout`: the activation standardised, or its quantile bin), or the
model answering a question with the bin's digit (:func:`train_token`).
``unfreeze="head"`` trains the head alone (the model frozen: its features are computed
once, so this is a linear probe trained by gradient descent); ``"last:N"`` trains the
model's last N blocks with it, so the model itself changes to report; ``"lora:R"`` adds
rank-R adapters to every block (:mod:`lora`) and trains those, the weights frozen. A
plain torch loop: AdamW, MSE on every token of the training windows, the validation loss
after each epoch, the best epoch's weights kept, stopping after ``patience`` epochs
without a better one; fixed seeds, so a run repeats exactly; with ``checkpoints`` the
whole state after every epoch, so that a resumed run ends where one straight through
would. The evaluation compares it on the test split with the baselines of
:mod:`evaluate`, computed on the frozen model before training.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from circuit_atlas.compute.activations import Window, padded
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.selfreport import evaluate as ev
from circuit_atlas.selfreport.params import EvalParams, TrainParams
from circuit_atlas.selfreport.tracking import Tracker
from circuit_atlas.stage import Progress, Report, open_lake

SPLITS = ("train", "val", "test")


@dataclass
class Data:
    """One split's windows and the neuron's activation at each of their tokens."""

    windows: list[Window]
    targets: np.ndarray  # (tokens,) float32, in window order

    @classmethod
    def of(cls, table: pl.DataFrame) -> Data:
        windows = [Window(w, d, s, tuple(t)) for w, d, s, t in table.select(
            "window_id", "prompt_id", "start", "token_ids").iter_rows()]
        acts = table["activations"].to_list()
        return cls(windows, np.concatenate(acts).astype(np.float32) if acts else
                   np.zeros(0, np.float32))

    @property
    def ends(self) -> np.ndarray:
        """The index of each window's last token in the per-token arrays."""
        return np.cumsum([len(w.tokens) for w in self.windows]) - 1

    def last(self) -> Data:
        """The same windows with the activation at their last token only."""
        return Data(self.windows, self.targets[self.ends])


def hidden(model, ids: torch.Tensor, read_layer: int) -> torch.Tensor:
    """The residual stream (B, T, d) after ``read_layer`` blocks (-1: the last hidden
    state, after the final norm)."""
    out = model.model.base_model(input_ids=ids, output_hidden_states=True, use_cache=False)
    return out.hidden_states[read_layer]


class _Given(torch.nn.Module):
    """Stands in for a frozen block while only later blocks train: the block just before
    the first trained one hands over the residual computed once (``value``), the ones
    before it pass their input through (none of it is used)."""

    def __init__(self, block: torch.nn.Module, hand_over: bool) -> None:
        super().__init__()
        self.attention_type = getattr(block, "attention_type", None)
        self.hand_over, self.value = hand_over, None

    def forward(self, hidden_states, *args, **kwargs):
        return self.value if self.hand_over else hidden_states


class Reader:
    """How training reads the model. With ``last:N`` the blocks before the first
    trained one never change, so the residual entering it is computed once per window
    and those blocks are skipped at every step (the forward then costs N blocks, not
    all of them); otherwise each read is a full forward."""

    def __init__(self, model, params: TrainParams, windows: list[Window],
                 batch: int = 16) -> None:
        self.model, self.read_layer = model, params.read_layer
        layers = model.model.base_model.layers
        first = len(layers) - params.blocks if params.blocks else 0
        # a read before the first trained block does not depend on the trained ones
        self.first = first if first > 0 and (self.read_layer < 0 or
                                             self.read_layer > first) else 0
        self.prefix: dict[int, torch.Tensor] = {}
        if self.first:
            seen = []
            hook = layers[self.first].register_forward_pre_hook(
                lambda _m, args, kwargs: seen.append(
                    (args[0] if args else kwargs["hidden_states"]).detach()),
                with_kwargs=True)
            try:
                with torch.no_grad():
                    for lo in range(0, len(windows), batch):
                        group = windows[lo:lo + batch]
                        seen.clear()
                        model.model.base_model(input_ids=padded(group, model.adapter.device),
                                               use_cache=False)
                        for i, w in enumerate(group):
                            self.prefix[w.window] = seen[0][i, :len(w.tokens)].clone()
            finally:
                hook.remove()

    def _skipping(self, windows: list[Window]):
        """The base model with its frozen blocks swapped out, the residual of ``windows``
        handed over; restored by calling the returned function."""
        layers = self.model.model.base_model.layers
        kept = [layers[i] for i in range(self.first)]
        given = [_Given(b, i == self.first - 1) for i, b in enumerate(kept)]
        T = max(len(w.tokens) for w in windows)
        value = torch.zeros(len(windows), T, self.model.adapter.d_model,
                            dtype=self.prefix[windows[0].window].dtype,
                            device=self.prefix[windows[0].window].device)
        for i, w in enumerate(windows):
            value[i, :len(w.tokens)] = self.prefix[w.window]
        given[-1].value = value
        for i, g in enumerate(given):
            layers[i] = g

        def restore() -> None:
            for i, b in enumerate(kept):
                layers[i] = b
        return restore

    def read(self, windows: list[Window]) -> torch.Tensor:
        """The residual (B, T, d) at ``read_layer`` (-1: after the final norm)."""
        ids = padded(windows, self.model.adapter.device)
        if not self.first:
            return hidden(self.model, ids, self.read_layer)
        layers, got = self.model.model.base_model.layers, []
        # after every block the read is the final norm's output, as hidden() gives it
        inner = 0 <= self.read_layer < len(layers)
        hook = (layers[self.read_layer - 1].register_forward_hook(
            lambda _m, _a, out: got.append(out[0] if isinstance(out, tuple) else out))
            if inner else None)
        restore = self._skipping(windows)
        try:
            out = self.model.model.base_model(input_ids=ids, use_cache=False)
        finally:
            restore()
            if hook is not None:
                hook.remove()
        return got[0] if hook is not None else out.last_hidden_state

    def logits(self, windows: list[Window]) -> torch.Tensor:
        """The model's logits (B, T, vocab)."""
        ids = padded(windows, self.model.adapter.device)
        if not self.first:
            return self.model.model(input_ids=ids, use_cache=False).logits
        restore = self._skipping(windows)
        try:
            return self.model.model(input_ids=ids, use_cache=False).logits
        finally:
            restore()

    def features(self, windows: list[Window]) -> torch.Tensor:
        """(tokens, d) float32 :meth:`read` at every token, without gradients."""
        return _per_token(self.read, windows, self.model.adapter.d_model)


def _per_token(read, windows: list[Window], d: int, batch: int = 16) -> torch.Tensor:
    """(tokens, d) float32 on the CPU: ``read(group)`` (B, T, d) of each batch of
    windows, without gradients, each window's padding dropped."""
    rows = []
    with torch.no_grad():
        for lo in range(0, len(windows), batch):
            group = windows[lo:lo + batch]
            h = read(group).float().cpu()
            rows.extend(h[i, :len(w.tokens)] for i, w in enumerate(group))
    return torch.cat(rows) if rows else torch.zeros(0, d)


def features(model, windows: list[Window], read_layer: int) -> np.ndarray:
    """(tokens, d) float32 residual stream of the frozen model at every token."""
    return _per_token(lambda group: hidden(model, padded(group, model.adapter.device),
                                           read_layer),
                      windows, model.adapter.d_model).numpy()


class Epochs:
    """What both training loops keep from epoch to epoch: a metrics row per epoch, the
    best validation loss and the state that reached it, and whether ``patience``
    epochs have passed without a better one."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best, self.best_state, self.since, self.rows = np.inf, None, 0, []

    def end(self, epoch: int, losses: list[float], val_loss: float, val_r2, t0: float,
            windows: int, snapshot) -> None:
        """Record an epoch; ``snapshot()`` is called to keep the state if it is best."""
        seconds = time.perf_counter() - t0
        self.rows.append({"epoch": epoch, "train_loss": float(np.mean(losses)),
                          "val_loss": val_loss, "val_r2": val_r2, "seconds": seconds,
                          "windows_per_s": windows / seconds})
        if val_loss < self.best:
            self.best, self.since, self.best_state = val_loss, 0, snapshot()
        else:
            self.since += 1

    @property
    def done(self) -> bool:
        return self.since >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "best_state": self.best_state, "since": self.since,
                "rows": self.rows}

    def restore(self, state: dict) -> None:
        self.best, self.best_state = state["best"], state["best_state"]
        self.since, self.rows = state["since"], state["rows"]


def _copy_into(params: list[torch.nn.Parameter], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.copy_(v)


def _trainable(model, params: TrainParams) -> list[torch.nn.Parameter]:
    """Freeze the model, then unfreeze (or add) what ``params.unfreeze`` trains."""
    from circuit_atlas.selfreport.lora import attach

    for p in model.model.parameters():
        p.requires_grad_(False)
    base, blocks = model.model.base_model, params.blocks
    if params.lora_rank:
        return attach(base.layers, params.lora_rank)
    if not blocks:
        return []
    if blocks > len(base.layers):
        raise CircuitAtlasError(f"--unfreeze last:{blocks}: the model has "
                                f"{len(base.layers)} blocks")
    params = [p for layer in base.layers[-blocks:] for p in layer.parameters()]
    params += list(base.norm.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def train(model, data: dict[str, Data], params: TrainParams, on_epoch=None,
          frozen: dict[str, np.ndarray] | None = None
          ) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Train the head (and the blocks or adapters ``params.unfreeze`` names) in place;
    returns the predictions on every split (in activation units) and one metrics row
    per epoch. ``frozen``: the frozen model's features of every split at ``read_layer``
    where already computed (the head alone trains on them)."""
    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    d, device = model.adapter.d_model, model.adapter.device
    readout = Readout(params.head, data["train"].targets, params.bins)
    head = torch.nn.Linear(d, readout.outputs).to(device=device, dtype=torch.float32)
    blocks = _trainable(model, params)
    optim = torch.optim.AdamW([*head.parameters(), *blocks], lr=params.lr)
    cached = reader = None
    if not params.trains_model:
        frozen = frozen or {s: features(model, data[s].windows, params.read_layer)
                            for s in SPLITS}
        cached = {s: torch.as_tensor(frozen[s]) for s in SPLITS}
    else:
        reader = Reader(model, params, [w for s in SPLITS for w in data[s].windows])

    def outputs(split: str) -> torch.Tensor:
        with torch.no_grad():
            h = cached[split] if cached is not None else reader.features(
                data[split].windows)
            return head(h.to(device)).cpu()

    def step(group: list[int]) -> float:
        windows = [data["train"].windows[i] for i in group]
        if cached is not None:
            x = torch.cat([cached["train"][offsets[i]:offsets[i + 1]] for i in group])
        else:
            h = reader.read(windows).float()
            x = torch.cat([h[j, :len(w.tokens)] for j, w in enumerate(windows)])
        y = torch.cat([targets[offsets[i]:offsets[i + 1]] for i in group])
        loss = readout.loss(head(x.to(device)), y.to(device))
        optim.zero_grad()
        loss.backward()
        optim.step()
        return float(loss.detach())

    lengths = [len(w.tokens) for w in data["train"].windows]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    targets = readout.encode(data["train"].targets)
    epochs, first = Epochs(params.patience), 0
    val = "val" if len(data["val"].targets) else "train"
    saved = Checkpoint(params, len(lengths)) if params.checkpoints else None
    if saved is not None and params.resume:
        state = saved.load()
        head.load_state_dict(state["head"])
        _copy_into(blocks, state["blocks"])
        optim.load_state_dict(state["optim"])
        rng.bit_generator.state = state["rng"]
        epochs.restore(state)
        # it had stopped early: nothing left to do
        first = params.epochs if epochs.done else state["epoch"] + 1
    for epoch in range(first, params.epochs):
        t0 = time.perf_counter()
        order = rng.permutation(len(lengths))
        losses = [step(list(order[lo:lo + params.batch_windows]))
                  for lo in range(0, len(order), params.batch_windows)]
        out = outputs(val)
        val_loss = float(readout.loss(out, readout.encode(data[val].targets)))
        epochs.end(epoch, losses, val_loss, ev.r2(data[val].targets, readout.decode(out)),
                   t0, len(lengths), lambda: copy.deepcopy((
                       {k: v.detach().clone() for k, v in head.state_dict().items()},
                       [p.detach().clone() for p in blocks])))
        if on_epoch:
            on_epoch(epoch, epochs.rows[-1])
        if saved is not None:
            saved.save({"epoch": epoch, "head": head.state_dict(),
                        "blocks": [p.detach().clone() for p in blocks],
                        "optim": optim.state_dict(), "rng": rng.bit_generator.state,
                        **epochs.state()})
        if epochs.done:
            break
    head.load_state_dict(epochs.best_state[0])
    _copy_into(blocks, epochs.best_state[1])
    return {s: readout.decode(outputs(s)) for s in SPLITS}, epochs.rows


class Readout:
    """What the head outputs and how that becomes an activation. ``regression``: one
    output, the activation standardised by the training split's mean and spread (MSE).
    ``classification``: one output per quantile bin of the training activations (cross
    entropy), read back as the bin's mean training activation."""

    def __init__(self, kind: str, train: np.ndarray, bins: int) -> None:
        self.kind = kind
        self.mean, self.std = float(train.mean()), float(train.std()) or 1.0
        self.edges = quantile_edges(train, bins)
        labels = np.searchsorted(self.edges, train)
        self.centers = np.array([train[labels == k].mean() if (labels == k).any() else
                                 np.nan for k in range(len(self.edges) + 1)])
        self.outputs = 1 if kind == "regression" else len(self.centers)

    def encode(self, y: np.ndarray) -> torch.Tensor:
        if self.kind == "regression":
            return torch.as_tensor((y - self.mean) / self.std, dtype=torch.float32)
        return torch.as_tensor(np.searchsorted(self.edges, y))

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "regression":
            return torch.nn.functional.mse_loss(out[:, 0], y)
        return torch.nn.functional.cross_entropy(out, y)

    def decode(self, out: torch.Tensor) -> np.ndarray:
        if self.kind == "regression":
            return out[:, 0].numpy() * self.std + self.mean
        return self.centers[out.argmax(1).numpy()]


def quantile_edges(train: np.ndarray, bins: int) -> np.ndarray:
    """The inner edges of ``bins`` quantile bins of the training activations (fewer
    where values repeat, as a neuron at 0 on most tokens does). A value equal to an edge
    goes to the bin below it (``np.searchsorted``'s left side), so a neuron at exactly 0
    but on its trigger still has a bin for 0 and one for what is above."""
    return np.unique(np.quantile(train, np.linspace(0, 1, bins + 1)[1:-1]))


QUESTION = " The activation of neuron {neuron} here, from 0 to {top}:"


def answer_tokens(tokenizer, bins: int) -> list[int]:
    """The token of each digit 0 .. bins-1 as an answer (" 5", else "5"), or a refusal
    where the tokenizer has no single token for one."""
    out = []
    for d in range(bins):
        for text in (f" {d}", f"{d}"):
            ids = tokenizer(text, add_special_tokens=False).input_ids
            # one token that reads back as the digit (not an unknown-token stand-in)
            if len(ids) == 1 and tokenizer.decode(ids).strip() == str(d):
                out.append(ids[0])
                break
        else:
            raise CircuitAtlasError(f"the tokenizer has no single token for the digit {d}: "
                                    "the token head answers in digits")
    return out


def train_token(model, data: dict[str, Data], params: TrainParams, label: str,
                on_epoch=None) -> tuple[dict[str, np.ndarray], list[dict]]:
    """The token head: each window followed by a question, the model trained (the blocks or
    adapters ``params.unfreeze`` names) to answer with the digit of the quantile bin of
    the activation at the window's last token; ``data`` holds those activations.
    Returns, per split, the answer read back as its bin's mean training activation (NaN
    where the model's most likely next token is no digit) and the metrics per epoch."""
    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    tokenizer, device = model.tokenizer, model.adapter.device
    answers = answer_tokens(tokenizer, params.bins)
    question = tuple(tokenizer(QUESTION.format(neuron=label, top=params.bins - 1),
                               add_special_tokens=False).input_ids)
    readout = Readout("classification", data["train"].targets, params.bins)
    blocks = _trainable(model, params)
    optim = torch.optim.AdamW(blocks, lr=params.lr)
    answer_ids = torch.as_tensor(answers, device=device)
    reader = Reader(model, params, [Window(w.window, w.doc, w.start, w.tokens + question)
                                    for s in SPLITS for w in data[s].windows])

    def logits(windows: list[Window]) -> torch.Tensor:
        asked = [Window(w.window, w.doc, w.start, w.tokens + question) for w in windows]
        out = reader.logits(asked)
        at = torch.as_tensor([len(w.tokens) - 1 for w in asked], device=device)
        return out[torch.arange(len(asked), device=device), at].float()

    def answer(split: str) -> tuple[np.ndarray, float]:
        ws, got, loss = data[split].windows, [], 0.0
        labels = readout.encode(data[split].targets)
        with torch.no_grad():
            for lo in range(0, len(ws), params.batch_windows):
                out = logits(ws[lo:lo + params.batch_windows])
                loss += float(torch.nn.functional.cross_entropy(
                    out, answer_ids[labels[lo:lo + params.batch_windows].to(device)],
                    reduction="sum"))
                got.append(out.argmax(1).cpu())
        top = torch.cat(got).numpy() if got else np.zeros(0, np.int64)
        digit = {int(t): k for k, t in enumerate(answers)}
        pred = np.array([readout.centers[digit[t]] if t in digit else np.nan for t in top])
        return pred, loss / max(len(ws), 1)

    train_labels = readout.encode(data["train"].targets)
    windows = data["train"].windows
    epochs = Epochs(params.patience)
    val = "val" if len(data["val"].targets) else "train"
    for epoch in range(params.epochs):
        t0 = time.perf_counter()
        order = rng.permutation(len(windows))
        losses = []
        for lo in range(0, len(order), params.batch_windows):
            group = order[lo:lo + params.batch_windows]
            loss = torch.nn.functional.cross_entropy(
                logits([windows[i] for i in group]),
                answer_ids[train_labels[torch.as_tensor(group)].to(device)])
            optim.zero_grad()
            loss.backward()
            optim.step()
            losses.append(float(loss.detach()))
        pred, val_loss = answer(val)
        ok = np.isfinite(pred)
        epochs.end(epoch, losses, val_loss,
                   ev.r2(data[val].targets[ok], pred[ok]) if ok.sum() > 1 else None, t0,
                   len(windows), lambda: [p.detach().clone() for p in blocks])
        if on_epoch:
            on_epoch(epoch, epochs.rows[-1])
        if epochs.done:
            break
    _copy_into(blocks, epochs.best_state)
    return {s: answer(s)[0] for s in SPLITS}, epochs.rows


class Checkpoint:
    """The state of a training run after its last epoch, in one file of a local folder,
    written whole (a temporary file renamed) so that a run killed while saving keeps the
    previous one."""

    def __init__(self, params: TrainParams, windows: int) -> None:
        from pathlib import Path

        self.params = {k: getattr(params, k) for k in params.__dataclass_fields__}
        self.folder = Path(params.checkpoints)
        self.path = self.folder / "checkpoint.pt"
        # what must match for a resumed run to be the same run
        self.key = {k: getattr(params, k) for k in ("neuron", "head", "bins", "read_layer",
                                                    "unfreeze", "lr", "batch_windows", "seed",
                                                    "patience")}
        self.key["windows"] = windows

    def save(self, state: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({**state, "key": self.key, "params": self.params}, tmp)
        tmp.replace(self.path)

    def load(self) -> dict:
        if not self.path.is_file():
            raise CircuitAtlasError(f"no checkpoint to resume from in {self.folder}")
        state = torch.load(self.path, weights_only=False)
        if state["key"] != self.key:
            differ = sorted(k for k in self.key if state["key"].get(k) != self.key[k])
            raise CircuitAtlasError(f"the checkpoint in {self.folder} is of another run "
                                    f"({', '.join(differ)} differ)")
        return state


def baselines(data: dict[str, Data], frozen: dict[str, np.ndarray], last: bool = False
              ) -> dict[str, dict[str, np.ndarray]]:
    """Predictions of the linear probe (on ``frozen``, the frozen model's features of
    every split), the bag of tokens and the mean on every split (``last``: at each
    window's last token only, the targets being those)."""
    def rows(x: np.ndarray, s: str) -> np.ndarray:
        return x[data[s].ends] if last else x

    probe, _ = ev.fit_ridge({s: (rows(frozen[s], s), data[s].targets) for s in SPLITS})
    bag, _ = ev.fit_ridge({s: (rows(ev.bag_of_tokens([w.tokens for w in data[s].windows]), s),
                               data[s].targets) for s in SPLITS})
    mean = float(data["train"].targets.mean())
    return {"linear probe": probe, "bag of tokens": bag,
            "mean": {s: np.full(len(data[s].targets), mean) for s in SPLITS}}


def publish_run(lake, model: str, corpus: str, spec, frame: pl.DataFrame, config: dict,
                key: str, same: pl.Expr) -> None:
    """A new version of a run table holding the earlier runs' rows and this run's, which
    replace the earlier rows ``same`` selects (the same run again); the manifest keeps
    every run's configuration under its ``key`` (the experiment's config, saved beside
    its results)."""
    old = lake.optional_table(spec.name, model, corpus)
    manifest = lake.table_manifest(model, corpus, spec.name) or {}
    runs = {**manifest.get("inputs", {}).get("runs", {}), key: config}
    if old is not None:
        kept = old.collect().drop("model", "corpus", strict=False).filter(~same)
        frame = pl.concat([kept, frame.select(kept.columns)], how="vertical_relaxed")
    version = lake.new_table_version(model, corpus, spec.name)
    version.publish([version.write("runs.parquet", frame.to_arrow(), spec)],
                    {"runs": runs, "model": model})


@dataclass
class TrainReport(Report):
    corpus: str
    neuron: str
    head: str
    unfreeze: str
    epochs: int
    results: dict[str, float]  # method -> test R²
    step: str = "train"  # or "eval": evaluated again from a checkpoint

    def __str__(self) -> str:
        shown = ", ".join(f"{m} {r:+.3f}" for m, r in self.results.items())
        return (f"self-report {self.step} {self.corpus} {self.neuron} ({self.head}, "
                f"{self.unfreeze}, {self.epochs} epochs): test R² {shown}")


def run_train(lake, *, model, corpora=None, params: TrainParams | None = None,
              cluster=None, progress: Progress | None = None) -> TrainReport:
    """Train a head (and, with ``last:N`` or ``lora:R``, blocks or adapters) to report
    the neuron of a corpus's ``selfreport_dataset``; evaluate it and the baselines on
    the test split; write ``selfreport_metrics`` and ``selfreport_results``."""
    from circuit_atlas.compute.models import load_model
    from circuit_atlas.lake.neurons import neuron_label, parse_neuron
    from circuit_atlas.lake.schemas import SELFREPORT_METRICS, SELFREPORT_RESULTS
    from circuit_atlas.selfreport.dataset import read_dataset

    lake, params = open_lake(lake), params or TrainParams()
    corpus, table, neurons = read_dataset(lake, model, corpora, "L12/N345")
    if params.neuron:
        want = parse_neuron(params.neuron)
        if want not in neurons:
            held = ", ".join(neuron_label(*n) for n in neurons)
            raise CircuitAtlasError(f"the dataset holds {held}, not {params.neuron}")
        layer, neuron = want
    elif len(neurons) == 1:
        layer, neuron = neurons[0]
    else:
        raise CircuitAtlasError("the dataset holds several neurons: pick one with --neuron")
    rows = table.filter((pl.col("layer") == layer) & (pl.col("neuron") == neuron))
    data = {s: Data.of(rows.filter(pl.col("split") == s).sort("window_id")) for s in SPLITS}
    if not len(data["train"].targets) or not len(data["test"].targets):
        raise CircuitAtlasError("the dataset needs training and test windows (more texts, or "
                                "a larger --test share)")
    loaded = load_model(model, device=params.device, dtype="float32", stage="selfreport")
    if progress:
        progress.update("self-report baselines", 0, 1)
    label = neuron_label(layer, neuron)
    config = {**{k: getattr(params, k) for k in params.__dataclass_fields__}, "neuron": label,
              "model": loaded.name, "revision": loaded.revision}
    tracker = Tracker(f"{label} {params.head} {params.unfreeze}", config)
    on_epoch = tracker.on_epoch(progress, "self-report train", params.epochs)

    try:
        # the frozen model's features, once: the probe's, and the head's when it trains
        # alone
        frozen = {s: features(loaded, data[s].windows, params.read_layer) for s in SPLITS}
        if params.head == "token":  # every method scored at each window's last token
            data = {s: d.last() for s, d in data.items()}
            base = baselines(data, frozen, last=True)
            preds, metrics = train_token(loaded, data, params, label, on_epoch)
        else:
            base = baselines(data, frozen)
            preds, metrics = train(loaded, data, params, on_epoch, frozen)
    except BaseException:
        tracker.finish()
        raise
    bins = Readout("classification", data["train"].targets, params.bins)
    results = []
    for method, p in {"self-report": preds, **base}.items():
        for s in ("val", "test"):
            if len(data[s].targets):
                results.append({"layer": layer, "neuron": neuron, "method": method,
                                "head": params.head, "unfreeze": params.unfreeze, "split": s,
                                **ev.scores(data[s].targets, p[s], bins.edges,
                                            bins.centers)})
    same = ((pl.col("layer") == layer) & (pl.col("neuron") == neuron)
            & (pl.col("head") == params.head) & (pl.col("unfreeze") == params.unfreeze))
    for spec, frame in ((SELFREPORT_METRICS, pl.DataFrame(metrics).with_columns(
            layer=pl.lit(layer, pl.Int16), neuron=pl.lit(neuron, pl.Int32),
            head=pl.lit(params.head), unfreeze=pl.lit(params.unfreeze))),
            (SELFREPORT_RESULTS, pl.DataFrame(results))):
        publish_run(lake, loaded.name, corpus, spec, frame, config,
                    f"{label} {params.head} {params.unfreeze}", same)
    if params.plots:
        from circuit_atlas.selfreport.plots import write_plots

        write_plots(params.plots, f"{label} ({params.head}, {params.unfreeze})", metrics,
                    data["test"].targets,
                    {m: p["test"] for m, p in {"self-report": preds, **base}.items()})
    test = {r["method"]: r["r2"] for r in results if r["split"] == "test"}
    tracker.finish({f"test_r2/{m}": r for m, r in test.items()})
    return TrainReport(corpus, label, params.head, params.unfreeze, len(metrics), test)


def run_eval(lake, *, model, corpora=None, params: EvalParams | None = None, cluster=None,
             progress: Progress | None = None) -> TrainReport:
    """Evaluate a training run again from its checkpoint: its best epoch's head and
    blocks, with the run's own configuration, on the test split beside the baselines,
    training no further; the tables are written as train writes them."""
    import dataclasses
    from pathlib import Path

    params = params or EvalParams()
    if not params.checkpoints:
        raise CircuitAtlasError("say which run: --checkpoints FOLDER (written by "
                                "self-report train --checkpoints)")
    path = Path(params.checkpoints) / "checkpoint.pt"
    if not path.is_file():
        raise CircuitAtlasError(f"no checkpoint in {params.checkpoints}")
    state = torch.load(path, weights_only=False)
    run = dataclasses.replace(TrainParams(**state["params"]), checkpoints=params.checkpoints,
                              resume=True, epochs=state["epoch"] + 1, plots=params.plots,
                              device=params.device)
    report = run_train(lake, model=model, corpora=corpora, params=run, progress=progress)
    report.step = "eval"
    return report
