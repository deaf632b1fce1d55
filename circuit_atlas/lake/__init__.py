"""The lake: the on-disk contract between the stages (no torch, no dask here).

    from circuit_atlas.lake import Lake
    lake = Lake("lake")                       # or Lake.init("lake") to create
    lake.scan("graph_edges", model="HuggingFaceTB/SmolLM2-135M-Instruct").collect()
    lake.table("neurons").collect()

See ``layout`` for where files live, ``schemas`` for what they hold, ``log`` for the
commit records, ``shards`` and ``derived`` for how tables are committed.
"""

from circuit_atlas.errors import LakeError, PromptFileError
from circuit_atlas.lake.cleanup import CleanupReport
from circuit_atlas.lake.ids import graph_id, params_hash, prompt_id
from circuit_atlas.lake.lake import ImportReport, Lake
from circuit_atlas.lake.layout import model_key
from circuit_atlas.lake.prompt_files import read_prompt_file
from circuit_atlas.lake.schemas import (
    EMBEDDING_LAYER,
    GRAPH_EDGES,
    GRAPH_NODES,
    GRAPHS,
    PROMPTS,
    REMAINDER_INDEX,
    TABLES,
    TableSpec,
    logit_layer,
)
from circuit_atlas.lake.shards import Shard, ShardWriter

__all__ = [
    "EMBEDDING_LAYER", "GRAPH_EDGES", "GRAPH_NODES", "GRAPHS", "PROMPTS", "REMAINDER_INDEX",
    "TABLES",
    "CleanupReport", "ImportReport", "Lake", "LakeError", "PromptFileError", "Shard",
    "ShardWriter", "TableSpec", "graph_id", "logit_layer", "model_key", "params_hash",
    "prompt_id", "read_prompt_file",
]
