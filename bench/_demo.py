"""What the benchmarks cut from the demo corpora."""

from __future__ import annotations


def demo_windows(tokenizer, windows: int, context: int) -> list:
    """``windows`` consecutive windows of ``context`` tokens of the demo corpora's texts
    joined (repeated until there are enough)."""
    from circuit_atlas.compute.activations import text_windows
    from circuit_atlas.demo import DEMO_CORPORA, demo_corpus_file
    from circuit_atlas.lake import read_prompt_file

    text = " ".join(r["text"] if isinstance(r, dict) else r for c in DEMO_CORPORA
                    for r in read_prompt_file(demo_corpus_file(c)))
    ids = tokenizer(text).input_ids
    while len(ids) < windows * context:
        ids = ids + ids
    return text_windows("demo", ids[:windows * context], context, context)
