"""The embedded OpenAI-compatible server over the real SmolLM2-135M-Instruct, talked to
by the unchanged openai client: 50 concurrent requests under the scorers' and the
labeler's JSON schemas all parse and validate (the grammar, not luck: a 135M model
left alone breaks JSON), logprobs come back and line up with the reply, and bad
requests get a 400 the client raises."""

import asyncio
import json
import math

import openai
import pytest

from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.labeling.replies import RATINGS
from circuit_atlas.labeling.scorers import _reply, _schema
from circuit_atlas.labeling.serve import Engine, Server, load_engine
from circuit_atlas.names import DEFAULT_MODEL


@pytest.fixture(scope="module")
def server(smollm2):
    with Server(Engine(smollm2.model, smollm2.tokenizer, smollm2.name, max_batch=50),
                port=0) as s:
        yield s


def ask(n: int):
    """Request ``n``: a detection, fuzzing or simulation reply (the labeler's schema is
    tested by the demo's labels, below)."""
    kind = ("detection", "fuzzing", "simulation")[n % 3]
    lengths = [1, 2] if kind == "simulation" else [1] * (2 + n % 2)
    return kind, _schema(kind, lengths), (
        f"Description: the token Paris\n\nExcerpts:\n1. I love Paris\n2. The cat sat{n}")


def test_fifty_concurrent_requests_are_schema_valid_with_logprobs(server):
    client = openai.AsyncOpenAI(base_url=server.url, api_key="none", max_retries=0,
                                timeout=600)

    async def one(n: int):
        kind, fmt, text = ask(n)
        r = await client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": text}], response_format=fmt,
            logprobs=True, top_logprobs=3, max_tokens=120)
        return n, kind, fmt, r

    async def all_():
        try:
            return await asyncio.gather(*(one(n) for n in range(50)))
        finally:
            await client.close()

    for n, kind, fmt, r in asyncio.run(all_()):
        content = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop", (n, content)
        props = fmt["json_schema"]["schema"]["properties"]
        lengths = ([p["minItems"] for p in props.values()] if kind == "simulation"
                   else [1] * next(iter(props.values()))["minItems"])
        got, error = _reply(kind, content, lengths)
        assert got is not None, (content, error)
        if kind == "simulation":
            assert all(len(row) == k and all(0 <= v <= 10 for v in row)
                       for row, k in zip(got, lengths, strict=True))
        else:
            assert all(isinstance(v, bool) for v in got)
        lp = r.choices[0].logprobs.content
        assert "".join(t.token for t in lp) == content
        for t in lp:
            assert t.logprob <= 0 and 1 <= len(t.top_logprobs) <= 3
            assert t.top_logprobs[0].logprob >= t.logprob - 1e-6  # greedy: the best allowed
            assert sum(math.exp(a.logprob) for a in t.top_logprobs) <= 1 + 1e-4
        assert r.usage.completion_tokens == len(lp) and r.usage.prompt_tokens > 0


def test_models_and_bad_requests(server):
    with pytest.raises(CircuitAtlasError, match="unknown model"):
        load_engine("/nonexistent/model")
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
    assert [m.id for m in client.models.list()] == [DEFAULT_MODEL]
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="streaming"):
        client.chat.completions.create(model="any", messages=msgs, stream=True)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="any", messages=msgs,
                                       response_format={"type": "xml"})
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="any", messages=[])
    r = client.chat.completions.create(model="any", messages=msgs, max_tokens=5,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 5
    free = client.chat.completions.create(model="any", messages=msgs, max_tokens=4)
    assert free.choices[0].logprobs is None and free.usage.completion_tokens <= 4
    again = client.chat.completions.create(model="any", messages=msgs, max_tokens=4)
    assert again.choices[0].message.content == free.choices[0].message.content  # greedy
    json.dumps(r.model_dump())


def test_the_demo_labels_and_scores_a_slice_through_the_embedded_server(demo_run):
    import polars as pl

    from circuit_atlas.lake import Lake

    lake, printed = Lake(demo_run[0]), demo_run[1]
    labels = lake.table("labels").filter(pl.col("labeler") == DEFAULT_MODEL).collect()
    # one neuron, twice: what drives it up and what drives it most negative
    assert len(labels) == 2 and set(labels["pass"]) == {"input", "negative"}
    assert labels["neuron"].n_unique() == 1
    ok = labels.filter(pl.col("status") == "ok")
    for r in ok.iter_rows(named=True):  # the grammar kept the reply to the schema
        assert r["type"] in ("token-pattern", "context", "position", "upstream-gated",
                             "combination") and r["interpretability"] in RATINGS
    scores = lake.table("label_scores").collect()
    assert set(scores["scorer_model"]) == {DEFAULT_MODEL}
    # every ok label is scored by every scorer its held-out contexts allow, and each
    # score is what its metrics say
    assert set(scores["neuron"]) <= set(ok["neuron"]) and len(scores) >= len(ok)
    used = []
    for r in scores.filter(pl.col("status") == "ok").iter_rows(named=True):
        m = json.loads(r["metrics"])
        key = "pearson" if r["scorer"] == "simulation" else "balanced_accuracy"
        assert r["score"] == m[key]
        used.append(m["logprobs"])  # false where the answers were split over tokens
        assert r["polarity"] == (-1 if r["pass"] == "negative" else 1)
    assert any(used)  # the embedded server returned logprobs and the scorers read them
    assert "label_scores" in printed and "near chance" in printed
    assert (demo_run[0] / "label-report" / "index.html").exists()


def test_embeddings_are_the_mean_of_the_last_hidden_state(server, smollm2):
    """POST /v1/embeddings through the openai client equals each text's last hidden
    state of a plain Hugging Face forward, averaged over its tokens, unit length (the
    batch is padded; each text's vector is as if it ran alone)."""
    import numpy as np
    import torch

    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
    texts = ["fires on insulin and the pancreas", "French cities", "a"]
    got = client.embeddings.create(model="any", input=texts)
    assert [d.index for d in got.data] == [0, 1, 2] and got.usage.prompt_tokens > 0
    for text, d in zip(texts, got.data, strict=True):
        ids = smollm2.tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            h = smollm2.model(ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
        want = (h / h.norm()).numpy()
        assert np.allclose(d.embedding, want, atol=1e-4)
    one = client.embeddings.create(model="any", input="French cities").data[0].embedding
    assert np.allclose(one, got.data[1].embedding, atol=1e-5)
    with pytest.raises(openai.BadRequestError, match="input"):
        client.embeddings.create(model="any", input=[])
