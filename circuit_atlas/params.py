"""What a stage's parameter dataclass says about its fields: name, type, default,
choices and the docstring under each field, for the CLI's options and the docs.

A field is documented the way the dataclasses of this package are written::

    candidates: int = 500
    \"\"\"Neurons kept as graph nodes: the top ones by |relevance|.\"\"\"

and a ``Literal[...]`` annotation gives its choices.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # int, float, str or bool (the type of one value)
    default: Any
    doc: str
    choices: tuple[str, ...] | None = None
    optional: bool = False  # None is allowed
    many: bool = False  # a tuple of values


@functools.cache
def _docs(cls: type) -> dict[str, str]:
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (a frozen app): no help text
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, after in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _unwrap(hint: Any) -> tuple[type, tuple[str, ...] | None, bool, bool]:
    optional = many = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
        origin = typing.get_origin(hint)
    if origin in (tuple, list):
        many, hint = True, typing.get_args(hint)[0]
        origin = typing.get_origin(hint)
    if origin is Literal:
        choices = tuple(str(a) for a in typing.get_args(hint))
        return str, choices, optional, many
    return hint, None, optional, many


def params(cls: type) -> list[Param]:
    """The fields of parameter dataclass ``cls``, in order."""
    hints = typing.get_type_hints(cls)
    docs = _docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        kind, choices, optional, many = _unwrap(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append(Param(f.name, kind, default, docs.get(f.name, ""), choices, optional, many))
    return out
