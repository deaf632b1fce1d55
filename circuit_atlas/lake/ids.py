"""Stable ids: content hashes, so that the same input always gets the same id."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def prompt_id(text: str) -> str:
    """16 hex digits of SHA-256 over the prompt's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal strings."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def params_hash(params: dict[str, Any]) -> str:
    """16 hex digits identifying a parameter set (key order does not matter)."""
    return hashlib.sha256(canonical_json(params).encode("utf-8")).hexdigest()[:16]


def graph_id(model: str, prompt: str, params: str) -> int:
    """A signed 64-bit id for the graph of prompt id ``prompt`` under (model, params hash)."""
    digest = hashlib.sha256(f"{model}\x00{prompt}\x00{params}".encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def window_id(prompt: str, start: int) -> int:
    """A non-negative 63-bit id for the window of prompt id ``prompt`` that begins at
    token ``start`` (an activation exemplar's context; -1 marks an empty slot)."""
    digest = hashlib.sha256(f"window\x00{prompt}\x00{start}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
