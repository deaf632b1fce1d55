"""A layer through the OpenAI Batch API (half the price): the requests go up as one
JSONL file, the batch is polled, its output downloaded and validated. The batch's id
is kept on the lake's filesystem, so a resumed run polls it instead of paying twice."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from typing import Any

from circuit_atlas.labeling.client import LLMSettings, Usage
from circuit_atlas.labeling.replies import response_format, validate
from circuit_atlas.lake.neurons import neuron_label
from circuit_atlas.lake.records import write_json_atomic


def batch_layer(settings: LLMSettings, pass_: str, layer: int,
                todo: list[tuple[int, list[dict[str, str]], str]],
                on_answer: Callable[[tuple, dict[str, Any] | None, str | None], None],
                retry: Callable[[list[tuple]], None], usage: Usage, fs: Any,
                state_path: str) -> None:
    """One layer through the Batch API: ``on_answer(item, parsed, error)`` for each of
    ``todo``, and ``retry(items)`` for the replies that did not validate (asked once
    more, one by one). The batch id survives a kill in ``state_path`` (on ``fs``)."""
    client = settings.client(async_=False)
    by_id = {neuron_label(layer, n): (n, msgs, phash) for n, msgs, phash in todo}
    state = None
    if fs.exists(state_path):
        with fs.open(state_path, "rb") as f:
            state = json.loads(f.read())
    if state is None or set(state["ids"]) != set(by_id):
        lines = [json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                             "body": {"model": settings.model, "messages": msgs,
                                      "response_format": response_format(
                                          pass_, settings.description_chars)}})
                 for cid, (_, msgs, _) in by_id.items()]
        upload = client.files.create(file=(f"layer-{layer}-{pass_}.jsonl",
                                           io.BytesIO("\n".join(lines).encode())),
                                     purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        state = {"batch": batch.id, "ids": sorted(by_id)}
        write_json_atomic(fs, state_path, state)
    while True:
        batch = client.batches.retrieve(state["batch"])
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            break
        time.sleep(settings.poll_s)
    answers: dict[str, str | None] = {}
    errors: dict[str, str] = {}
    if batch.status != "completed" or not batch.output_file_id:
        errors = {cid: f"batch {batch.status}" for cid in by_id}
    else:
        for line in client.files.content(batch.output_file_id).text.splitlines():
            item = json.loads(line)
            body = (item.get("response") or {}).get("body") or {}
            counted = body.get("usage") or {}
            usage.prompt_tokens += counted.get("prompt_tokens", 0)
            usage.completion_tokens += counted.get("completion_tokens", 0)
            try:
                answers[item["custom_id"]] = body["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                errors[item["custom_id"]] = f"batch item error: {item.get('error')}"
    again = []
    for cid, (n, msgs, phash) in by_id.items():
        parsed, error = validate(pass_, answers.get(cid)) if cid in answers else (
            None, errors.get(cid, "missing from the batch output"))
        if parsed is None and cid in answers:
            again.append((n, msgs, phash))  # a reply that does not validate: ask once more
            continue
        on_answer((n, msgs, phash), parsed, error)
    if again:
        retry(again)
    fs.rm(state_path)
