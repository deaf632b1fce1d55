"""The LLM client: settings, one request with its retry, and the one bounded fan-out.

The official ``openai`` client talks to ``base_url`` (OpenAI, vLLM, Ollama, ...); its
own retries give exponential backoff on 429, 5xx and timeouts. A reply that does not
parse or validate is asked once more, then returned as a failure with the reason.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.labeling.replies import response_format, validate


class Usage(Protocol):
    prompt_tokens: int
    completion_tokens: int


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


async def ask(client: Any, settings: LLMSettings, pass_: str, msgs: list[dict[str, str]],
              usage: Usage) -> tuple[dict[str, Any] | None, str | None]:
    """One neuron: a validated label, or (None, reason) after one more try."""
    import openai

    error = None
    for _ in range(2):
        try:
            resp = await client.chat.completions.create(
                model=settings.model, messages=msgs, response_format=response_format(pass_))
        except (openai.AuthenticationError, openai.NotFoundError,
                openai.PermissionDeniedError) as e:
            raise CircuitAtlasError(f"the LLM endpoint refused: {e}") from e
        except openai.APIError as e:  # after the client's own retries with backoff
            return None, f"{type(e).__name__}: {str(e)[:200]}"
        if resp.usage is not None:
            usage.prompt_tokens += resp.usage.prompt_tokens or 0
            usage.completion_tokens += resp.usage.completion_tokens or 0
        parsed, error = validate(pass_, resp.choices[0].message.content)
        if parsed is not None:
            return parsed, None
    return None, error


async def fan_out(settings: LLMSettings, pass_: str,
                  items: Iterable[tuple[Any, list[dict[str, str]]]],
                  on_answer: Callable[[Any, dict[str, Any] | None, str | None], None],
                  usage: Usage) -> None:
    """Ask each (key, messages) item, at most ``settings.concurrency`` at once;
    ``on_answer(key, parsed, error)`` as each reply arrives."""
    client = settings.client()
    gate = asyncio.Semaphore(settings.concurrency)

    async def one(key: Any, msgs: list[dict[str, str]]) -> None:
        async with gate:
            parsed, error = await ask(client, settings, pass_, msgs, usage)
        on_answer(key, parsed, error)

    try:
        await asyncio.gather(*(one(k, m) for k, m in items))
    finally:
        await client.close()
