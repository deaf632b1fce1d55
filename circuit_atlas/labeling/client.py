"""The LLM client: settings, one request with its retry, and the one bounded fan-out.

The official ``openai`` client talks to ``base_url`` (OpenAI, vLLM, Ollama, ...); its
own retries give exponential backoff on 429, 5xx and timeouts. A reply that does not
parse or validate is asked once more, then returned as a failure with the reason.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.labeling.replies import DESCRIPTION, response_format, validate

TOP_LOGPROBS = 5


class Usage(Protocol):
    prompt_tokens: int
    completion_tokens: int


@dataclass(kw_only=True)
class Tally:
    """What a run of questions came to: the reports of labeling and of scoring."""

    asked: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def answered(self, ok: bool) -> None:
        self.asked += 1
        self.ok += ok
        self.failed += not ok


@dataclass
class LLMSettings:
    model: str
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout: float = 60.0
    max_retries: int = 5
    price_in: float = 0.0  # per million prompt tokens
    price_out: float = 0.0  # per million completion tokens
    batch: bool = False
    poll_s: float = 30.0
    logprobs: bool = True  # asked for where a scorer reads them
    description_chars: int = DESCRIPTION  # the longest description a label reply may hold

    def client(self, async_: bool = True) -> Any:
        import openai

        key = os.environ.get(self.api_key_env)
        if not key:
            if self.base_url is None:
                raise CircuitAtlasError(f"no API key: set ${self.api_key_env} (or --api-key-env)")
            key = "none"  # local servers (vLLM, Ollama) accept any key
        cls = openai.AsyncOpenAI if async_ else openai.OpenAI
        return cls(api_key=key, base_url=self.base_url, timeout=self.timeout,
                   max_retries=self.max_retries)


@dataclass
class Request:
    """One question: the messages, the reply's JSON schema, and ``check(content,
    logprobs)`` -> (the answer, None) or (None, why the reply is not one)."""

    messages: list[dict[str, str]]
    response_format: dict[str, Any]
    check: Callable[[str | None, list | None], tuple[Any, str | None]]
    logprobs: bool = False
    sampling: dict[str, Any] = field(default_factory=dict)  # e.g. temperature, seed


@dataclass
class EmbeddingSettings:
    """An OpenAI-compatible embeddings endpoint (``POST /v1/embeddings``)."""

    model: str
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 60.0
    batch: int = 256  # texts per request

    def embed(self, texts: list[str]) -> Any:
        """The unit-length embeddings of ``texts`` (numpy, one row per text)."""
        import numpy as np
        import openai

        client = LLMSettings(model=self.model, base_url=self.base_url,
                             api_key_env=self.api_key_env, timeout=self.timeout).client(
                                 async_=False)
        rows = []
        try:
            for i in range(0, len(texts), self.batch):
                part = texts[i:i + self.batch]
                try:
                    resp = client.embeddings.create(model=self.model, input=part)
                except openai.APIError as e:
                    raise CircuitAtlasError(f"the embedding endpoint failed: {e}") from e
                got = sorted(resp.data, key=lambda d: d.index)
                if len(got) != len(part):
                    raise CircuitAtlasError(f"the embedding endpoint answered {len(got)} "
                                            f"vectors for {len(part)} texts")
                rows += [d.embedding for d in got]
        finally:
            client.close()
        v = np.asarray(rows, dtype=np.float64).reshape(len(texts), -1)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def label_request(pass_: str, msgs: list[dict[str, str]], description_chars: int = DESCRIPTION,
                  sampling: dict[str, Any] | None = None) -> Request:
    """A labeling question of ``pass_`` (output, input, negative, cluster)."""
    return Request(msgs, response_format(pass_, description_chars),
                   lambda text, _lp: validate(pass_, text), sampling=sampling or {})


async def ask(client: Any, settings: LLMSettings, request: Request, usage: Usage
              ) -> tuple[Any, str | None]:
    """One question: a checked answer, or (None, reason) after one more try. An endpoint
    that refuses logprobs is asked without them (and no more for the rest of the run)."""
    import openai

    error, tries = None, 2
    while tries:
        extra = ({"logprobs": True, "top_logprobs": TOP_LOGPROBS}
                 if request.logprobs and settings.logprobs else {})
        try:
            resp = await client.chat.completions.create(
                model=settings.model, messages=request.messages,
                response_format=request.response_format, **request.sampling, **extra)
        except openai.BadRequestError as e:
            if extra and "logprob" in str(e).lower():
                settings.logprobs = False
                continue  # not a try: the same question without logprobs
            return None, f"{type(e).__name__}: {str(e)[:200]}"
        except (openai.AuthenticationError, openai.NotFoundError,
                openai.PermissionDeniedError) as e:
            raise CircuitAtlasError(f"the LLM endpoint refused: {e}") from e
        except openai.APIError as e:  # after the client's own retries with backoff
            return None, f"{type(e).__name__}: {str(e)[:200]}"
        if resp.usage is not None:
            usage.prompt_tokens += resp.usage.prompt_tokens or 0
            usage.completion_tokens += resp.usage.completion_tokens or 0
        tries -= 1
        choice = resp.choices[0]
        logprobs = getattr(getattr(choice, "logprobs", None), "content", None)
        parsed, error = request.check(choice.message.content, logprobs)
        if parsed is not None:
            return parsed, None
    return None, error


async def fan_out(settings: LLMSettings, items: Iterable[tuple[Any, Request]],
                  on_answer: Callable[[Any, Any, str | None], None], usage: Usage) -> None:
    """Ask each (key, request) item, at most ``settings.concurrency`` at once;
    ``on_answer(key, answer, error)`` as each reply arrives."""
    client = settings.client()
    gate = asyncio.Semaphore(settings.concurrency)

    async def one(key: Any, request: Request) -> None:
        async with gate:
            parsed, error = await ask(client, settings, request, usage)
        on_answer(key, parsed, error)

    try:
        await asyncio.gather(*(one(k, r) for k, r in items))
    finally:
        await client.close()
