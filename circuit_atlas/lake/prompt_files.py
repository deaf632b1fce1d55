"""Reading prompt files: JSON, JSONL, YAML, CSV, Parquet and plain text.

Every format yields the same records: ``{"text", "domain", "meta"}``. A record is
either a string (the prompt) or a mapping with a ``prompt`` or ``text`` key (or
the key named by ``text_field``), an optional ``domain``, and any other fields,
which are kept as JSON in ``meta``. JSON and YAML files hold a list of records,
or a mapping with a ``prompts`` list. Plain text holds one prompt per line
(blank lines are skipped). Text is kept byte for byte: nothing is stripped or
normalised, so a prompt's id (a hash of its bytes) is what the user expects.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from circuit_atlas.errors import PromptFileError
from circuit_atlas.lake.ids import canonical_json

FORMATS: dict[str, tuple[str, ...]] = {
    "json": (".json",),
    "jsonl": (".jsonl", ".ndjson"),
    "yaml": (".yaml", ".yml"),
    "csv": (".csv",),
    "parquet": (".parquet", ".pq"),
    "txt": (".txt", ".text", ".lst"),
}
TEXT_KEYS = ("prompt", "text")

Record = dict[str, Any]


def detect_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    for fmt, suffixes in FORMATS.items():
        if suffix in suffixes:
            return fmt
    accepted = ", ".join(s for suffixes in FORMATS.values() for s in suffixes)
    raise PromptFileError(
        f"{path}: cannot tell the format from the suffix {suffix or '(none)'!r}; "
        f"use one of {accepted}, or pass --format {'|'.join(FORMATS)}"
    )


def _record(item: Any, where: str, text_field: str | None) -> Record:
    if isinstance(item, str):
        text, domain, meta = item, None, {}
    elif isinstance(item, dict):
        keys = (text_field,) if text_field else TEXT_KEYS
        key = next((k for k in keys if k in item), None)
        if key is None:
            raise PromptFileError(
                f"{where}: no {' or '.join(repr(k) for k in keys)} key "
                f"(keys: {', '.join(map(str, item)) or 'none'})"
            )
        text = item[key]
        domain = item.get("domain")
        meta = {str(k): v for k, v in item.items() if k not in (key, "domain")}
        if domain is not None and not isinstance(domain, str):
            raise PromptFileError(f"{where}: 'domain' must be a string, got {domain!r}")
    else:
        raise PromptFileError(
            f"{where}: expected a prompt string or a mapping with a 'prompt' or 'text' key, "
            f"got {type(item).__name__}"
        )
    if not isinstance(text, str):
        raise PromptFileError(f"{where}: the prompt must be a string, got {type(text).__name__}")
    if not text.strip():
        raise PromptFileError(f"{where}: empty prompt")
    return {
        "text": text,
        "domain": domain or None,
        # default=str keeps YAML dates and the like instead of failing on them
        "meta": json.loads(json.dumps(meta, default=str)) if meta else None,
    }


def _records_from_document(doc: Any, path: str, text_field: str | None) -> list[Record]:
    items = doc.get("prompts") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise PromptFileError(
            f"{path}: expected a list of prompts (strings, or mappings with a 'prompt' or "
            f"'text' key), or a mapping with a 'prompts' list; got {type(doc).__name__}"
        )
    return [_record(item, f"{path}: prompt {i + 1}", text_field) for i, item in enumerate(items)]


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PromptFileError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from e


def _json(path: str, text_field: str | None) -> list[Record]:
    try:
        doc = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise PromptFileError(
            f"{path}: not valid JSON: line {e.lineno} column {e.colno}: {e.msg}"
        ) from e
    return _records_from_document(doc, path, text_field)


def _jsonl(path: str, text_field: str | None) -> list[Record]:
    out = []
    for n, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{path}: line {n}: not valid JSON: {e.msg}") from e
        out.append(_record(item, f"{path}: line {n}", text_field))
    return out


def _yaml(path: str, text_field: str | None) -> list[Record]:
    import yaml

    try:
        doc = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PromptFileError(f"{path}: not valid YAML{where}: {problem}") from e
    if doc is None:
        return []
    return _records_from_document(doc, path, text_field)


def _csv(path: str, text_field: str | None) -> list[Record]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    columns = reader.fieldnames or []
    keys = (text_field,) if text_field else TEXT_KEYS
    if not any(k in columns for k in keys):
        raise PromptFileError(
            f"{path}: CSV header has no {' or '.join(repr(k) for k in keys)} column "
            f"(columns: {', '.join(columns) or 'none'})"
        )
    try:
        rows = list(reader)
    except csv.Error as e:
        raise PromptFileError(f"{path}: not valid CSV at line {reader.line_num}: {e}") from e
    out = []
    for n, row in enumerate(rows, start=2):
        item = {k: v for k, v in row.items() if k is not None and v != ""}
        if None in row:
            raise PromptFileError(f"{path}: line {n}: more fields than the header names")
        out.append(_record(item, f"{path}: line {n}", text_field))
    return out


def _parquet(path: str, text_field: str | None) -> list[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise PromptFileError(f"{path}: not a readable Parquet file: {e}") from e
    items = [{k: v for k, v in row.items() if v is not None} for row in rows]
    return [_record(item, f"{path}: row {i + 1}", text_field) for i, item in enumerate(items)]


def _txt(path: str, text_field: str | None) -> list[Record]:
    out = []
    for n, line in enumerate(_read_text(path).split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip():
            out.append(_record(line, f"{path}: line {n}", None))
    return out


_READERS = {"json": _json, "jsonl": _jsonl, "yaml": _yaml, "csv": _csv, "parquet": _parquet,
            "txt": _txt}


def read_prompt_file(
    path: str | os.PathLike, fmt: str | None = None, text_field: str | None = None
) -> list[Record]:
    """The prompts of a file as records ``{"text", "domain", "meta"}``, in file order.

    Raises :class:`PromptFileError` (one line, naming the file and the place) for a
    file that does not parse, a record without a prompt, or a file with no prompts.
    """
    path = os.fspath(path)
    fmt = fmt or detect_format(path)
    if fmt not in _READERS:
        raise PromptFileError(
            f"unknown prompt file format {fmt!r}; use one of {', '.join(FORMATS)}"
        )
    if not os.path.exists(path):
        raise PromptFileError(f"{path}: no such file")
    records = _READERS[fmt](path, text_field)
    if not records:
        raise PromptFileError(f"{path}: no prompts found")
    return records


def meta_json(meta: dict[str, Any] | None) -> str | None:
    return canonical_json(meta) if meta else None
