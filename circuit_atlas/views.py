"""Self-contained HTML views: a template shipped in a package, with its data inlined as
JSON in place of ``/*__DATA__*/null`` (nothing is fetched at view time)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

PLACEHOLDER = "/*__DATA__*/null"


def html_template(package: str, name: str) -> str:
    return resources.files(package).joinpath(name).read_text(encoding="utf-8")


def inline(template: str, data: Any) -> str:
    # "</" inside inlined JSON would end the script element
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return template.replace(PLACEHOLDER, payload)


def write_html(package: str, name: str, data: Any, path: str) -> None:
    """The template ``name`` of ``package`` with ``data`` inlined, written to ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(inline(html_template(package, name), data))
