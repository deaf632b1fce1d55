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
