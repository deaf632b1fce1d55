"""A neuron's exemplars as a person or an LLM reads them: the contexts with the
activating tokens marked, delphi's ``<<token>>`` style, and what the model predicts
next there.

The activations stage writes one exemplars table per corpus; an atlas reduced over
several corpora (``general+medical``) reads them all and keeps each neuron's
strongest contexts across them.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from circuit_atlas.lake import Lake
from circuit_atlas.lake.splits import held_out

MARK = 0.5  # a token is marked where its activation reaches this share of the exemplar's
SPLITS = ("all", "shown", "held_out")


def corpora_of(corpus: str) -> list[str]:
    """The corpora of a (possibly joint, ``a+b``) corpus partition."""
    return corpus.split("+")


def has_table(lake: Lake, model: str, corpus: str, name: str) -> bool:
    """Whether any corpus of ``corpus`` has the table ``name``."""
    return any(lake.optional_table(name, model, c) is not None for c in corpora_of(corpus))


def layer_extremes(lake: Lake, model: str, corpus: str, layer: int) -> pl.DataFrame | None:
    """Each neuron of ``layer``'s smallest and largest activation over the corpora of
    ``corpus`` (neuron, min, max); None without activation statistics."""
    parts = [t.filter(pl.col("layer") == layer).select("neuron", "min", "max")
             for c in corpora_of(corpus)
             if (t := lake.optional_table("activation_stats", model, c)) is not None]
    if not parts:
        return None
    return pl.concat(parts).collect().group_by("neuron").agg(pl.col("min").min(),
                                                               pl.col("max").max())


def read_exemplars(lake: Lake, model: str, corpus: str, layer: int,
                   neurons: list[int] | None = None, top: int = 5, split: str = "all"
                   ) -> pl.DataFrame | None:
    """The ``top`` exemplars per sign of the neurons of ``layer`` (all, or
    ``neurons``) over the corpora of ``corpus``, strongest first, with each window's
    token ids and next-token predictions; None when no corpus has exemplars.
    ``split``: "shown" only texts the labeler may see, "held_out" only the others."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    parts = []
    for c in corpora_of(corpus):
        ex = lake.optional_table("exemplars", model, c)
        win = lake.optional_table("exemplar_windows", model, c)
        if ex is None or win is None:
            continue
        mine = pl.col("layer") == layer
        if split == "all":
            mine &= pl.col("rank") < top
        else:
            out = held_out(pl.col("prompt_id"))
            mine &= out if split == "held_out" else ~out
        if neurons is not None:
            mine &= pl.col("neuron").is_in(neurons)
        parts.append(ex.filter(mine).with_columns(corpus=pl.lit(c)).join(
            win.select("window_id", "skip", "token_ids", "next_tokens"), on="window_id",
            how="left"))
    if not parts:
        return None
    rows = pl.concat(parts).collect()
    strength = pl.col("activation") * pl.col("sign")
    # ties (equal activations, e.g. of two corpora) in a fixed order: every reader of the
    # same lake shows the same exemplars
    return (rows.sort(["neuron", "sign", strength, "corpus", "window_id", "position"],
                      descending=[False, True, True, False, False, False])
            .with_columns(rank=pl.int_range(pl.len()).over("neuron", "sign"))
            .filter(pl.col("rank") < top))


def highlighted(tokens: list[str], acts: list[float], peak: float, skip: int = 0,
                mark: float = MARK) -> str:
    """The context with every counted token (from ``skip`` on) whose activation
    reaches ``mark`` of ``peak`` (the exemplar's, of its sign) between << and >>."""
    def marked(i: int, a: float) -> bool:
        return i >= skip and peak != 0 and a / peak >= mark

    return "".join(f"<<{t}>>" if marked(i, a) else t
                   for i, (t, a) in enumerate(zip(tokens, acts, strict=True)))


def token_texts(rows: pl.DataFrame, tokenizer: Any = None) -> dict[int, str]:
    """Every token id of the rows' windows and predictions, decoded once."""
    ids = set()
    for col in ("token_ids", "next_tokens"):
        ids.update(rows[col].explode().drop_nulls().unique().to_list())
    if tokenizer is None:
        return {t: f"#{t}" for t in ids}
    return {t: tokenizer.decode([t]) for t in ids}


def exemplar_dicts(rows: pl.DataFrame, tokenizer: Any = None,
                   texts: dict[int, str] | None = None) -> list[dict[str, Any]]:
    """JSON-ready exemplars: the highlighted text, the token at the peak and the
    model's top next-token predictions there (token ids when no tokenizer is given).
    ``texts``: token id -> text, when the caller decoded them already."""
    texts = texts if texts is not None else token_texts(rows, tokenizer)
    out = []
    for r in rows.iter_rows(named=True):
        tokens = [texts[t] for t in r["token_ids"]]
        nxt = r["next_tokens"] or []
        p = r["position"]
        out.append({
            "sign": r["sign"], "rank": r["rank"], "activation": r["activation"],
            "corpus": r["corpus"], "prompt_id": r["prompt_id"],
            "position": r["start"] + p, "token": tokens[p] if p < len(tokens) else None,
            "text": highlighted(tokens, r["acts"], r["activation"], r["skip"] or 0),
            "next_tokens": [texts[t] for t in nxt[5 * p:5 * p + 5]],
        })
    return out


def neuron_exemplars(lake: Lake, model: str, corpus: str, layer: int, neuron: int,
                     top: int = 5, tokenizer: Any = None) -> dict[str, list[dict[str, Any]]] | None:
    """{"top": [...], "bottom": [...]} exemplars of one neuron; None without exemplars."""
    rows = read_exemplars(lake, model, corpus, layer, [neuron], top)
    if rows is None:
        return None
    return {name: exemplar_dicts(rows.filter(pl.col("sign") == sign), tokenizer)
            for name, sign in (("top", 1), ("bottom", -1))}


def activation_stats(lake: Lake, model: str, corpus: str, layer: int, neuron: int
                     ) -> list[dict[str, Any]]:
    """The neuron's activation statistics, one row per corpus that has them."""
    out = []
    for c in corpora_of(corpus):
        t = lake.optional_table("activation_stats", model, c)
        if t is None:
            continue
        rows = t.filter((pl.col("layer") == layer) & (pl.col("neuron") == neuron)).select(
            corpus=pl.lit(c), count="count", mean="mean", std="std",
            frac_positive="frac_positive", min="min", max="max", quantiles="quantiles",
            static_rank_corr="static_rank_corr", corr_tokens="corr_tokens",
        ).collect()
        out += rows.to_dicts()
    return out


def token_means(lake: Lake, model: str, corpus: str, layer: int, neurons: list[int],
                tokenizer: Any = None, top: int = 10) -> dict[int, list[dict[str, Any]]]:
    """Per neuron, the tokens at which its mean activation in context is highest
    (from every corpus of ``corpus`` that has them, strongest first)."""
    parts = []
    for c in corpora_of(corpus):
        t = lake.optional_table("token_activations", model, c)
        if t is not None:
            parts.append(t.filter((pl.col("layer") == layer) & pl.col("neuron").is_in(neurons)
                                  ).with_columns(corpus=pl.lit(c)))
    out: dict[int, list[dict[str, Any]]] = {}
    if not parts:
        return out
    rows = pl.concat(parts).collect().sort(["neuron", "mean"], descending=[False, True])
    for r in rows.iter_rows(named=True):
        mine = out.setdefault(r["neuron"], [])
        if len(mine) < top:
            t = r["token_id"]
            text = tokenizer.decode([t]) if tokenizer is not None else f"#{t}"
            mine.append({"token": text, "count": r["count"], "mean": r["mean"],
                         "static": r["static"], "corpus": r["corpus"]})
    return out
