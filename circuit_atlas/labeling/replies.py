"""What an LLM must answer: one JSON schema per pass (structured output), and the check
of a reply against it, label hygiene included (:func:`clean_label`). A reply that does
not validate is never stored as a label."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

MAX_WORDS = 12
# characters: twelve words fit; in the schema, so a grammar-constrained model that
# rambles is stopped early rather than refused after writing 120 characters
LABEL_CHARS = 80
RATINGS = ("low", "medium", "high")  # the labeler's own interpretability rating
# characters: a sentence or three. The schema says so, so a grammar-constrained model
# cannot ramble for thousands of tokens
DESCRIPTION = 600
# what a reply that reasons instead of naming starts with (one public atlas stored such
# text as labels)
REASONING = re.compile(r"^(let me|let's|i think|i believe|i would|okay|ok,|so,|first,|"
                       r"looking at|based on|the evidence|this neuron|the neuron|it seems|"
                       r"it appears|to determine|we )", re.I)
NON_ANSWERS = re.compile(r"^(no clear (pattern|function|theme)|unclear|unknown|n/?a|none|"
                         r"not (clear|interpretable|enough)|uninterpretable|cannot (tell|"
                         r"determine|say)|insufficient (evidence|data)|mixed|various|"
                         r"polysemantic)\W*$", re.I)


def clean_label(text: str) -> str:
    """A label as given, or a ValueError saying why it is not one: empty, reasoning
    text, longer than a few words, or a non-answer ("no clear pattern"), which is
    recorded as such and never shown as a label."""
    label = " ".join(text.split()).strip(" .")
    if len(label) > 1 and label[0] == label[-1] and label[0] in "\"'":
        label = label[1:-1].strip(" .")  # wrapped in quotes; a quoted token inside stays
    if not label:
        raise ValueError("empty label")
    if "\n" in text.strip() or REASONING.match(label) or label.endswith("?"):
        raise ValueError(f"reasoning text, not a label: {label[:60]!r}")
    if len(label.split()) > MAX_WORDS:
        raise ValueError(f"{len(label.split())} words, not a label of a few words")
    if NON_ANSWERS.match(label):
        raise ValueError(f"a non-answer, not a label: {label!r}")
    return label


class _Label(BaseModel):
    label: str = Field(min_length=1, max_length=LABEL_CHARS)

    @field_validator("label")
    @classmethod
    def _hygiene(cls, value: str) -> str:
        return clean_label(value)


class OutputLabel(_Label):
    description: str = Field(min_length=1, max_length=DESCRIPTION)
    type: Literal["semantic", "lexical", "routing", "formatting", "structural"]
    interpretability: Literal["low", "medium", "high"]


class InputLabel(_Label):
    description: str = Field(min_length=1, max_length=DESCRIPTION)
    type: Literal["token-pattern", "context", "position", "upstream-gated", "combination"]
    interpretability: Literal["low", "medium", "high"]


class ClusterLabel(_Label):
    coherence: float = Field(ge=0, le=1)


SCHEMAS = {"output": OutputLabel, "input": InputLabel, "negative": InputLabel,
           "cluster": ClusterLabel}


def response_format(pass_: str, description_chars: int = DESCRIPTION) -> dict[str, Any]:
    """The reply schema of ``pass_``; ``description_chars`` caps the description below
    :data:`DESCRIPTION` (a grammar-constrained small model writes to the cap, and every
    character it writes is a decode step)."""
    schema = SCHEMAS[pass_].model_json_schema()
    schema["additionalProperties"] = False
    if "description" in schema.get("properties", {}):
        schema["properties"]["description"]["maxLength"] = min(description_chars, DESCRIPTION)
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
