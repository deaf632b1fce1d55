"""What every analysis needs to know about the reduced tables it starts from."""

from __future__ import annotations

from dataclasses import dataclass

from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake import Lake, graph_id
from circuit_atlas.lake.layout import corpus_key


@dataclass
class Reduced:
    corpus: str  # the tables' corpus key, "<a>+<b>"
    n_layers: int
    shards: list  # the committed shards the tables hold, in fold order
    graphs: dict[str, int]  # distinct graphs per corpus
    n_graphs: int  # distinct graphs in all (a prompt in two corpora is one graph)


def reduced(lake: Lake, model: str, corpora: list[str]) -> Reduced:
    """The reduce of (model, corpora), checked to be current and to know the model's
    layer count; a clear error naming the command to run otherwise."""
    from circuit_atlas.lake.shards import ordered_shards

    ck = corpus_key(corpora)
    manifest = lake.table_manifest(model, ck, "neurons")
    flags = " ".join(f"--corpus {c}" for c in sorted(set(corpora)))
    if manifest is None:
        raise CircuitAtlasError(f"no reduced tables for {model!r} / {ck!r}; run: "
                                f"circuit-atlas reduce {flags}")
    shards = ordered_shards(lake, model, sorted(set(corpora)))
    if [f"{s.corpus}/{s.shard}" for s in shards] != manifest["inputs"]["shards"]:
        raise CircuitAtlasError("graphs were committed since the last reduce; run "
                                f"circuit-atlas reduce {flags} first so that the tables agree")
    shape = manifest["inputs"].get("model_shape") or {}
    if "n_layers" not in shape:
        raise CircuitAtlasError("the reduced tables do not record the model's layer count "
                                "(older shards); recompute the graphs with this version")
    seen: dict[str, set[int]] = {c: set() for c in sorted(set(corpora))}
    for s in shards:
        seen[s.corpus].update(graph_id(s.commit["model"], p, s.params_hash)
                              for p in s.prompt_ids)
    return Reduced(ck, shape["n_layers"], shards, {c: len(g) for c, g in seen.items()},
                   len(set().union(*seen.values())))
