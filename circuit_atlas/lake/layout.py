"""Where everything lives under a lake root: the only module that spells paths.

    <root>/_lake.json
    <root>/prompts/corpus=<c>/part-<id>.parquet
    <root>/graphs/model=<m>/corpus=<c>/shard=<s>/{graphs,nodes,edges}.parquet, _COMMIT.json
    <root>/tables/model=<m>/corpus=<c>/<table>/...

All paths here are relative to the root and use "/" (they are fsspec paths).
"""

from __future__ import annotations

import re

from circuit_atlas.errors import LakeError

LAKE_FILE = "_lake.json"
COMMIT_FILE = "_COMMIT.json"
# Written when a shard is opened, so cleanup can tell a live writer from debris.
WRITING_FILE = "_WRITING.json"
TMP_MARK = ".tmp-"

PROMPTS = "prompts"
GRAPHS = "graphs"
TABLES = "tables"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def check_name(kind: str, value: str) -> str:
    """A corpus, model key, shard or table name, checked to be safe as a path part."""
    if not isinstance(value, str) or not _NAME.match(value) or len(value) > 200:
        raise LakeError(
            f"invalid {kind} name {value!r}: use letters, digits and . _ + - "
            "(starting with a letter or digit, at most 200 characters)"
        )
    return value


def model_key(model: str) -> str:
    """The partition value for a model name: a hub id's '/' becomes '--'.

    "HuggingFaceTB/SmolLM2-135M-Instruct" -> "HuggingFaceTB--SmolLM2-135M-Instruct".
    """
    return check_name("model", model.strip("/").replace("/", "--"))


def prompts_dir(corpus: str) -> str:
    return f"{PROMPTS}/corpus={check_name('corpus', corpus)}"


def prompts_part(corpus: str, part_id: str) -> str:
    return f"{prompts_dir(corpus)}/part-{part_id}.parquet"


def shard_dir(model: str, corpus: str, shard: str) -> str:
    return (
        f"{GRAPHS}/model={check_name('model', model)}/corpus={check_name('corpus', corpus)}"
        f"/shard={check_name('shard', shard)}"
    )


def shard_file(model: str, corpus: str, shard: str, table: str) -> str:
    return f"{shard_dir(model, corpus, shard)}/{table}.parquet"


def shard_glob(model: str | None = None, corpus: str | None = None) -> str:
    """A glob matching the directories of graph shards (committed or not)."""
    m = check_name("model", model) if model else "*"
    c = check_name("corpus", corpus) if corpus else "*"
    return f"{GRAPHS}/model={m}/corpus={c}/shard=*"


def corpus_key(corpora: list[str] | tuple[str, ...]) -> str:
    """The corpus partition of tables reduced from several corpora together."""
    return "+".join(sorted({check_name("corpus", c) for c in corpora}))


def table_dir(model: str, corpus: str, table: str) -> str:
    return (
        f"{TABLES}/model={check_name('model', model)}/corpus={check_name('corpus', corpus)}"
        f"/{check_name('table', table)}"
    )


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
