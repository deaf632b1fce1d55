"""What an LLM must answer: one JSON schema per pass (structured output), and the check
of a reply against it. A reply that does not validate is never stored as a label."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError


class OutputLabel(BaseModel):
    label: str = Field(min_length=1, max_length=200)
    description: str = Field(min_length=1, max_length=2000)
    type: Literal["semantic", "lexical", "routing", "formatting", "structural"]
    interpretability: Literal["low", "medium", "high"]


class InputLabel(BaseModel):
    label: str = Field(min_length=1, max_length=200)
    description: str = Field(min_length=1, max_length=2000)
    type: Literal["token-pattern", "context", "position", "upstream-gated", "combination"]
    interpretability: Literal["low", "medium", "high"]


class ClusterLabel(BaseModel):
    label: str = Field(min_length=1, max_length=200)
    coherence: float = Field(ge=0, le=1)


SCHEMAS = {"output": OutputLabel, "input": InputLabel, "cluster": ClusterLabel}


def response_format(pass_: str) -> dict[str, Any]:
    schema = SCHEMAS[pass_].model_json_schema()
    schema["additionalProperties"] = False
    return {"type": "json_schema",
            "json_schema": {"name": f"{pass_}_label", "schema": schema, "strict": True}}


def validate(pass_: str, text: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """A reply's label fields, or why it is not one."""
    if not text:
        return None, "empty reply"
    try:
        return SCHEMAS[pass_].model_validate_json(text).model_dump(), None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "reply"
        return None, f"invalid reply ({where}: {first['msg']})"
