"""The held-out split: one text in ``HELD_OUT`` is never shown to the labeler, so its
labels are scored on contexts it has not seen. By the text's id (a content hash), so
the split is by document and the same in every run and every table."""

from __future__ import annotations

import polars as pl

HELD_OUT = 5


def held_out(prompt_id: pl.Expr) -> pl.Expr:
    """Whether a text (by its ``prompt_id``) is held out of the labeling prompts."""
    return prompt_id.str.slice(0, 8).str.to_integer(base=16) % HELD_OUT == 0


# a context is a negative for a neuron only where the neuron stays below this share of
# its largest activation at every token shown (hard negatives are chosen by it too)
NOT_ACTIVE = 0.1


def document_split(prompt_id: pl.Expr, val: float, test: float) -> pl.Expr:
    """"train", "val" or "test" for a text by its ``prompt_id``: a share ``test`` of the
    documents, then ``val``, by another part of the id's hash than :func:`held_out`
    reads, so the same document is in the same split in every run."""
    bucket = prompt_id.str.slice(8, 8).str.to_integer(base=16) % 10_000
    return (pl.when(bucket < round(test * 10_000)).then(pl.lit("test"))
            .when(bucket < round((test + val) * 10_000)).then(pl.lit("val"))
            .otherwise(pl.lit("train")))
