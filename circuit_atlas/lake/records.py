"""The lake's small JSON records (_lake.json, writer markers):
written to a temporary name and renamed, read back with a one-line error."""

from __future__ import annotations

import json
import uuid
from typing import Any

from circuit_atlas.errors import LakeError
from circuit_atlas.lake import layout


def write_json_atomic(fs, path: str, value: dict[str, Any], token: str | None = None
                      ) -> None:
    """Write JSON to a temporary sibling (named with ``token``, default a random one)
    and rename it into place."""
    tmp = layout.tmp_name(path, token or uuid.uuid4().hex[:8])
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(tmp, "wb") as f:
        f.write(json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False).encode())
    fs.mv(tmp, path)


def read_record(fs, path: str, fmt: str, what: str) -> dict[str, Any]:
    """A JSON record whose ``format`` is ``fmt``, or a LakeError naming the file."""
    try:
        with fs.open(path, "rb") as f:
            record = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise LakeError(f"{path}: unreadable {what}: {e}") from e
    if not isinstance(record, dict) or record.get("format") != fmt:
        raise LakeError(f"{path}: not a circuit-atlas {what}")
    return record
