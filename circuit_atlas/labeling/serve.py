"""``circuit-atlas serve``: an OpenAI-compatible chat-completions server over a local
model (the embedded SmolLM2-135M-Instruct by default), so labeling and scoring run
with no API key and no network; with ``--base-url`` the same commands talk to vLLM or
OpenAI instead.

- ``POST /v1/chat/completions``: ``messages`` (through the model's chat template),
  ``max_tokens`` / ``max_completion_tokens``, ``temperature`` (default 0 here: greedy,
  so the same question gets the same answer), ``seed``, ``response_format``
  (``json_schema``: decoding constrained by the schema's grammar, compiled by
  xgrammar, the grammar engine of vLLM and SGLang, so every reply parses and
  validates; ``json_object``: any JSON), ``logprobs`` with ``top_logprobs`` (of the
  distribution each token was drawn from: the model's, restricted to what the
  grammar allows and renormalised), ``n`` 1 only, no streaming.
- ``POST /v1/embeddings``: ``input`` (a string or a list): the model's last hidden
  state averaged over each text's tokens, unit length (semantic label search).
- ``GET /v1/models``.

Requests are taken concurrently; a scheduler thread decodes up to ``max_batch`` of
those waiting together, one forward per step for the whole batch (left-padded, with
a KV cache), and answers each as it finishes.
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from circuit_atlas.errors import CircuitAtlasError

MAX_TOKENS = 2048  # a reply's default limit
COLLECT_S = 0.25  # wait this long for more requests to join a batch (a client's burst
# of requests arrives over tens of milliseconds; a batch then runs for seconds)


class BadRequest(Exception):
    """A request the server cannot answer: its message goes back with a 400."""


@dataclass
class Job:
    prompt: list[int]
    grammar: Any  # xgrammar.CompiledGrammar or None (free text)
    max_tokens: int
    temperature: float
    top_logprobs: int | None  # None: no logprobs
    seed: int | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str = "length"
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Engine:
    """A causal LM that decodes batches of jobs, each under its own grammar."""

    def __init__(self, model: Any, tokenizer: Any, name: str, max_batch: int = 8) -> None:
        import xgrammar as xgr

        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        vocab = model.config.vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(self.info)  # caches compiled schemas
        self.vocab = vocab
        stops = {tokenizer.eos_token_id, *self.info.stop_token_ids}
        for extra in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
            tid = tokenizer.convert_tokens_to_ids(extra)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
                stops.add(tid)
        self.stops = {s for s in stops if s is not None}
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(
            self.stops)
        self.context = getattr(model.config, "max_position_embeddings", 8192)
        self._texts: dict[int, str] = {}

    # requests -------------------------------------------------------------------------

    def job(self, body: dict[str, Any]) -> Job:
        """A job from a chat-completions request body, or BadRequest saying why not."""
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest("messages: a non-empty list is required")
        if body.get("stream"):
            raise BadRequest("stream: streaming is not supported by this server")
        if (body.get("n") or 1) != 1:
            raise BadRequest("n: only n=1 is supported")
        try:
            prompt = self.tokenizer.apply_chat_template(
                [{"role": m["role"], "content": m["content"]} for m in msgs],
                add_generation_prompt=True, tokenize=True, return_dict=False)
        except (KeyError, TypeError, ValueError) as e:
            raise BadRequest(f"messages: {e}") from e
        prompt = list(prompt["input_ids"] if isinstance(prompt, dict) else prompt)
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or MAX_TOKENS
        room = self.context - len(prompt)
        if room < 1:
            raise BadRequest(f"the prompt has {len(prompt)} tokens; the model's context is "
                             f"{self.context}")
        top = body.get("top_logprobs") if body.get("logprobs") else None
        if top is not None and not 0 <= int(top) <= 20:
            raise BadRequest("top_logprobs: between 0 and 20")
        temperature = float(body.get("temperature") or 0.0)
        return Job(prompt, self.grammar(body.get("response_format")), min(int(limit), room),
                   temperature, None if top is None else int(top), body.get("seed"))

    def grammar(self, fmt: dict[str, Any] | None) -> Any:
        if not fmt or fmt.get("type") == "text":
            return None
        if fmt.get("type") == "json_object":
            return self.compiler.compile_builtin_json_grammar()  # any JSON
        if fmt.get("type") != "json_schema":
            raise BadRequest(f"response_format: unknown type {fmt.get('type')!r}")
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise BadRequest("response_format.json_schema.schema: a JSON schema is required")
        try:
            # compact JSON: whitespace the grammar allowed, a small model spent tokens on
            return self.compiler.compile_json_schema(json.dumps(schema), strict_mode=True,
                                                     any_whitespace=False)
        except (RuntimeError, ValueError) as e:
            raise BadRequest(f"response_format: the schema does not compile: {e}") from e

    def text(self, token: int) -> str:
        if token not in self._texts:
            self._texts[token] = self.tokenizer.decode([token])
        return self._texts[token]

    # decoding -------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, jobs: list[Job]) -> None:
        """Decode ``jobs`` together until each has finished (grammar complete, a stop
        token, or its token limit)."""
        import xgrammar as xgr

        n = len(jobs)
        width = max(len(j.prompt) for j in jobs)
        ids = torch.full((n, width), self.pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, j in enumerate(jobs):  # left padding: every row's last token is at the end
            ids[i, width - len(j.prompt):] = torch.tensor(j.prompt)
            mask[i, width - len(j.prompt):] = 1
        matchers = [xgr.GrammarMatcher(j.grammar) if j.grammar is not None else None
                    for j in jobs]
        bitmask = xgr.allocate_token_bitmask(n, self.vocab)
        gens = [torch.Generator().manual_seed(j.seed if j.seed is not None else 0) for j in jobs]
        active = list(range(n))
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), use_cache=True,
                         logits_to_keep=1)
        cache = out.cache
        while active:
            logits = out.logits[:, -1].float().cpu()
            for i in active:
                if matchers[i] is not None:
                    matchers[i].fill_next_token_bitmask(bitmask, i)
            constrained = [i for i in active if matchers[i] is not None]
            if constrained:
                xgr.apply_token_bitmask_inplace(logits, bitmask, indices=constrained)
            nxt = torch.full((n,), self.pad, dtype=torch.long)
            for i in list(active):
                j = jobs[i]
                token, lp, top = self._pick(logits[i], j, gens[i])
                nxt[i] = token
                m = matchers[i]
                if m is not None and not m.accept_token(token):
                    j.error, j.finish_reason = "the grammar refused a token", "stop"
                    active.remove(i)
                    continue
                if token in self.stops:  # the end of the answer, not a part of it
                    j.finish_reason = "stop"
                    active.remove(i)
                    continue
                j.tokens.append(token)
                if j.top_logprobs is not None:
                    j.logprobs.append((lp, top))
                if m is not None and m.is_terminated():
                    j.finish_reason = "stop"
                    active.remove(i)
                elif len(j.tokens) >= j.max_tokens:
                    active.remove(i)
            if not active:
                break
            mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], 1)
            positions = positions[:, -1:] + 1
            out = self.model(input_ids=nxt[:, None].to(self.device),
                             attention_mask=mask.to(self.device),
                             position_ids=positions.to(self.device), cache=cache,
                             use_cache=True)
            cache = out.cache

    def _pick(self, logits: torch.Tensor, job: Job, gen: torch.Generator
              ) -> tuple[int, float, list[tuple[int, float]]]:
        t = job.temperature
        logp = torch.log_softmax(logits / t if t > 0 else logits, -1)
        if t > 0:
            token = int(torch.multinomial(logp.exp(), 1, generator=gen))
        else:
            token = int(torch.argmax(logp))
        top: list[tuple[int, float]] = []
        if job.top_logprobs:
            vals, idx = torch.topk(logp, job.top_logprobs)
            top = [(int(i), float(v)) for i, v in zip(idx, vals, strict=True)
                   if math.isfinite(float(v))]
        return token, float(logp[token]), top

    # answers --------------------------------------------------------------------------

    EMBED_TOKENS = 256  # a text's tokens read for its embedding, at most

    def embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        """An embeddings response: each input's last hidden state averaged over its
        tokens, unit length (a small chat model is a weak embedder, but labels of
        the same thing land near each other; use a real one where you have it)."""
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(
                isinstance(t, str) and t for t in texts):
            raise BadRequest("input: a non-empty string or list of non-empty strings")
        ids = [self.tokenizer(t).input_ids[:self.EMBED_TOKENS] for t in texts]
        width = max(map(len, ids))
        tokens = torch.full((len(ids), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):  # right-padded: positions count from each text's start
            tokens[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        with torch.no_grad():
            out = self.model(input_ids=tokens.to(self.device), attention_mask=mask.to(
                self.device), output_hidden_states=True)
        h = out.hidden_states[-1].float()
        m = mask.to(h.device).unsqueeze(-1).float()
        v = (h * m).sum(1) / m.sum(1)
        v = torch.nn.functional.normalize(v, dim=-1).cpu()
        n = int(mask.sum())
        return {"object": "list", "model": self.name,
                "data": [{"object": "embedding", "index": i, "embedding": row.tolist()}
                         for i, row in enumerate(v)],
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    def completion(self, job: Job) -> dict[str, Any]:
        content = self.tokenizer.decode(job.tokens)
        choice: dict[str, Any] = {"index": 0, "finish_reason": job.finish_reason,
                                  "message": {"role": "assistant", "content": content},
                                  "logprobs": None}
        if job.top_logprobs is not None:
            choice["logprobs"] = {"content": [
                {"token": self.text(t), "logprob": lp,
                 "bytes": list(self.text(t).encode()),
                 "top_logprobs": [{"token": self.text(a), "logprob": v,
                                   "bytes": list(self.text(a).encode())} for a, v in top]}
                for t, (lp, top) in zip(job.tokens, job.logprobs, strict=True)], "refusal": None}
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion",
                "created": int(time.time()), "model": self.name, "choices": [choice],
                "usage": {"prompt_tokens": len(job.prompt),
                          "completion_tokens": len(job.tokens),
                          "total_tokens": len(job.prompt) + len(job.tokens)}}


class Scheduler:
    """One thread that takes waiting jobs in batches of up to ``max_batch``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.waiting: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="serve-decode")
        self.thread.start()

    def submit(self, job: Job) -> Job:
        self.waiting.put(job)
        job.done.wait()
        return job

    def close(self) -> None:
        self.waiting.put(None)
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            first = self.waiting.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + COLLECT_S
            while len(batch) < self.engine.max_batch:
                try:
                    job = self.waiting.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self.waiting.put(None)
                    break
                batch.append(job)
            try:
                self.engine.run(batch)
            except Exception as e:  # noqa: BLE001 - every waiting request must get an answer
                for job in batch:
                    job.error = f"{type(e).__name__}: {e}"
            for job in batch:
                job.done.set()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # clients open many connections at once (the default: 5)


class Server:
    """The HTTP server on ``host``:``port`` (0: any free port), in a thread:
    ``with Server(engine) as s: s.url``."""

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.engine = engine
        self.scheduler = Scheduler(engine)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, code: int, message: str) -> None:
                self._send(code, {"error": {"message": message, "type": (
                    "invalid_request_error" if code == 400 else "server_error"),
                    "param": None, "code": None}})

            def do_GET(self) -> None:  # noqa: N802
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [
                        {"id": engine.name, "object": "model", "created": 0,
                         "owned_by": "circuit-atlas"}]})
                else:
                    self._error(404, f"no route {self.path}")

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.rstrip("/").endswith("/embeddings"):
                    try:
                        self._send(200, engine.embeddings(json.loads(body)))
                    except json.JSONDecodeError:
                        self._error(400, "the body is not JSON")
                    except BadRequest as e:
                        self._error(400, str(e))
                    return
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._error(404, f"no route {self.path}")
                    return
                try:
                    job = engine.job(json.loads(body))
                except json.JSONDecodeError:
                    self._error(400, "the body is not JSON")
                    return
                except BadRequest as e:
                    self._error(400, str(e))
                    return
                server.scheduler.submit(job)
                if job.error is not None:
                    self._error(500, job.error)
                else:
                    self._send(200, engine.completion(job))

        self.httpd = _HTTPServer((host, port), Handler)
        h, p = self.httpd.server_address[:2]
        self.url = f"http://{h}:{p}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                       name="serve-http")

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        finally:
            self.close()

    def close(self) -> None:
        self.httpd.shutdown() if self.thread.is_alive() else None
        self.httpd.server_close()
        self.scheduler.close()


def load_engine(model: str, device: str = "cpu", dtype: str = "auto", max_batch: int = 8,
                progress: Any = None) -> Engine:
    """The engine over a model by name, folder or GGUF file (the embedded default
    included); the error names xgrammar when it is missing."""
    try:
        import xgrammar  # noqa: F401
    except ImportError as e:
        raise CircuitAtlasError("circuit-atlas serve needs xgrammar: bash scripts/setup "
                                "installs it") from e
    from circuit_atlas.compute.models import loaded

    m = loaded(model, device, dtype, "activations", progress)  # forward only, like it
    return Engine(m.model, m.tokenizer, m.name, max_batch)
