"""Where everything lives under a lake root: the only module that spells paths.

    <root>/_lake.json
    <root>/prompts/corpus=<c>/part-<id>.parquet
    <root>/graphs/model=<m>/corpus=<c>/shard=<s>/part-0.parquet        (and graph_nodes/,
    <root>/graph_nodes/model=<m>/corpus=<c>/shard=<s>/part-0.parquet    graph_edges/: the
    <root>/graph_edges/model=<m>/corpus=<c>/shard=<s>/part-0.parquet    three per-graph tables)
    <root>/activations/model=<m>/corpus=<c>/shard=<s>/<table>.parquet   activation shards
    <root>/tables/model=<m>/corpus=<c>/<table>/v-<id>/<file>.parquet    derived tables
    <root>/_log/prompts/corpus=<c>/<n>.json                 commit records (see ``log``)
    <root>/_log/shards/model=<m>/corpus=<c>/<n>.json
    <root>/_log/activations/model=<m>/corpus=<c>/<n>.json
    <root>/_log/tables/model=<m>/corpus=<c>/<table>/<n>.json
    <root>/_log/writing/<shard>.json                        markers of shards being written
    <root>/_state/model=<m>/corpus=<c>/<table>/v-<id>/...   what an incremental run resumes from
    <root>/_scratch/...                                     intermediate data of a running job

Table directories hold Parquet data files only; everything else is under ``_log``,
``_state`` and ``_scratch``. All paths here are relative to the root and use "/"
(they are fsspec paths).
"""

from __future__ import annotations

import functools
import re

from circuit_atlas.errors import LakeError

LAKE_FILE = "_lake.json"
TMP_MARK = ".tmp-"

PROMPTS = "prompts"
GRAPH_TABLES = ("graphs", "graph_nodes", "graph_edges")  # a shard writes one file of each
ACTIVATIONS = "activations"  # activation shards: one directory each, one file per table
TABLES = "tables"
LOG = "_log"
STATE = "_state"
SCRATCH = "_scratch"
PART = "part-0.parquet"  # the one file of a shard in each per-graph table

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def check_name(kind: str, value: str) -> str:
    """A corpus, model key, shard or table name, checked to be safe as a path part."""
    if not isinstance(value, str):
        raise LakeError(_invalid(kind, value))
    return _checked_name(kind, value)


@functools.lru_cache(maxsize=65536)  # called for every file of every snapshot
def _checked_name(kind: str, value: str) -> str:
    if not _NAME.match(value) or len(value) > 200:
        raise LakeError(_invalid(kind, value))
    return value


def _invalid(kind: str, value: object) -> str:
    return (f"invalid {kind} name {value!r}: use letters, digits and . _ + - "
            "(starting with a letter or digit, at most 200 characters)")


def model_key(model: str) -> str:
    """The partition value for a model name: a hub id's '/' becomes '--'.

    "HuggingFaceTB/SmolLM2-135M-Instruct" -> "HuggingFaceTB--SmolLM2-135M-Instruct".
    """
    return check_name("model", model.strip("/").replace("/", "--"))


def prompts_dir(corpus: str) -> str:
    return f"{PROMPTS}/corpus={check_name('corpus', corpus)}"


def prompts_part(corpus: str, part_id: str) -> str:
    return f"{prompts_dir(corpus)}/part-{part_id}.parquet"


def prompts_log(corpus: str) -> str:
    return f"{LOG}/{prompts_dir(corpus)}"


def _model_corpus(model: str, corpus: str) -> str:
    return f"model={check_name('model', model)}/corpus={check_name('corpus', corpus)}"


def shard_dir(table: str, model: str, corpus: str, shard: str) -> str:
    """The directory of a shard's file in the per-graph ``table``."""
    if table not in GRAPH_TABLES:
        raise LakeError(f"a graph shard holds {', '.join(GRAPH_TABLES)}, not {table!r}")
    return f"{table}/{_model_corpus(model, corpus)}/shard={check_name('shard', shard)}"


def shard_file(table: str, model: str, corpus: str, shard: str) -> str:
    return f"{shard_dir(table, model, corpus, shard)}/{PART}"


def shards_log(model: str, corpus: str) -> str:
    return f"{LOG}/shards/{_model_corpus(model, corpus)}"


def activation_dir(model: str, corpus: str, shard: str) -> str:
    return f"{ACTIVATIONS}/{_model_corpus(model, corpus)}/shard={check_name('shard', shard)}"


def activations_log(model: str, corpus: str) -> str:
    return f"{LOG}/{ACTIVATIONS}/{_model_corpus(model, corpus)}"


def writing_marker(shard: str) -> str:
    return f"{LOG}/writing/{check_name('shard', shard)}.json"


def corpus_key(corpora: list[str] | tuple[str, ...]) -> str:
    """The corpus partition of tables reduced from several corpora together."""
    return "+".join(sorted({check_name("corpus", c) for c in corpora}))


def table_dir(model: str, corpus: str, table: str) -> str:
    return f"{TABLES}/{_model_corpus(model, corpus)}/{check_name('table', table)}"


def table_log(model: str, corpus: str, table: str) -> str:
    return f"{LOG}/{table_dir(model, corpus, table)}"


def state_dir(model: str, corpus: str, table: str) -> str:
    return f"{STATE}/{_model_corpus(model, corpus)}/{check_name('table', table)}"


def tmp_name(path: str, token: str) -> str:
    """A temporary sibling of ``path``: readers never list it, cleanup removes it."""
    head, _, tail = path.rpartition("/")
    return f"{head}/.{tail}{TMP_MARK}{token}" if head else f".{tail}{TMP_MARK}{token}"


def partition_values(path: str) -> dict[str, str]:
    """The hive ``key=value`` parts of a path, e.g. {"model": ..., "corpus": ...}."""
    out = {}
    for part in path.split("/"):
        key, eq, value = part.partition("=")
        if eq and key and value:
            out[key] = value
    return out
