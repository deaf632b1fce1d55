"""A small OpenAI-compatible HTTP server for the labeling tests, on 127.0.0.1.

It answers chat completions deterministically from the prompt (the label names the
neuron and pass), serves files and batches for the Batch API, records every request,
and can be told to misbehave per neuron: "429", "500", "hang", "malformed" (not
JSON), "invalid" (JSON that breaks the schema), "reasoning", "nonanswer", "essay" (valid
JSON whose label is not a label). The client under test is the real
``openai`` package talking HTTP to it.

It also plays a label scorer (requests whose schema is named ``*_score``): a label
that quotes a token ("fires on "w5"") is read as "the neuron fires exactly at that
token", and the excerpts are judged by it, so a true label scores 1 and a false one
near chance; for the intervention check ("raises "w20""), the candidate set holding
the quoted token is chosen. With ``logprobs`` it returns each answer token's top alternatives
(the answer at 0.9, another at 0.1); ``refuse_logprobs`` answers 400 to them instead.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

NEURON = re.compile(r"Neuron (L\d+/N\d+)")
# faults whose reply is schema-valid JSON with a label that label hygiene must refuse
HYGIENE = {"reasoning": "Let me look at the evidence: the neuron seems to fire on commas",
           "nonanswer": "No clear pattern",
           "essay": " ".join(["fire"] * 15)}


def _word(text: str, word: str | None) -> bool:
    """Whether ``word`` is a token of the test vocabulary's text (tokens w0..w62 joined
    without spaces: a 'w' starts every token)."""
    return word is not None and re.search(re.escape(word) + r"(?!\d)", text) is not None


def excerpts(user: str) -> list[str]:
    body = user.split("Excerpts:\n", 1)[1].split("\n\nEach excerpt", 1)[0]
    return [re.sub(r"^\d+\. ", "", line) for line in body.split("\n")]


def score_answer(scorer: str, user: str) -> dict[str, Any]:
    """The deterministic scorer's reply: judged by the token the label quotes."""
    quoted = re.search(r'"([^"]+)"', user.split("\n", 1)[0])
    word = quoted.group(1) if quoted else None
    if scorer == "intervention":  # the candidate set holding the quoted token, else the first
        rounds = re.split(r"\n\nRound \d+:\n", "\n\n" + user.split("\n\n", 1)[1])[1:]
        choices = []
        for block in rounds:
            sets = [json.loads(re.sub(r"^\d+\. ", "", line)) for line in block.split("\n")]
            choices.append(next((i + 1 for i, t in enumerate(sets) if word in t), 1))
        return {"choices": choices}
    shown = excerpts(user)
    if scorer == "detection":
        return {"activates": [_word(e, word) for e in shown]}
    if scorer == "fuzzing":
        def right(e: str) -> bool:
            marks = re.findall(r"<<(.*?)>>", e)
            return bool(marks) and all(m == word for m in marks)
        return {"correct": [right(e) for e in shown]}
    return {f"excerpt_{i + 1}": [10 if t == word else 0 for t in json.loads(e)]
            for i, e in enumerate(shown)}


def logprob_tokens(content: str) -> list[dict[str, Any]]:
    """The reply cut into tokens, each answer token with two alternatives."""
    out = []
    for tok in re.findall(r"true|false|\d+|\s+|[^\s\d]", content):
        item = {"token": tok, "logprob": math.log(0.9), "bytes": None, "top_logprobs": []}
        if tok in ("true", "false") or tok.isdigit():
            other = {"true": "false", "false": "true"}.get(tok, "0" if tok != "0" else "10")
            item["top_logprobs"] = [
                {"token": tok, "logprob": math.log(0.9), "bytes": None},
                {"token": other, "logprob": math.log(0.1), "bytes": None}]
        out.append(item)
    return out


def answer(messages: list[dict[str, str]]) -> tuple[str, str, dict[str, Any]]:
    """(neuron or cluster id, pass, label fields) for a labeling prompt."""
    user = messages[-1]["content"]
    cluster = re.match(r"Cluster (\S+), (\d+) labelled", user)
    if cluster:
        return f"C{cluster.group(1)}", "cluster", {
            "label": f"cluster {cluster.group(1)} of {cluster.group(2)}", "coherence": 0.75}
    nid = NEURON.search(user).group(1)
    system = messages[0]["content"]
    pass_ = "output" if "DOES" in system else "negative" if "NEGATIVE" in system else "input"
    return nid, pass_, {
        "label": f"{pass_} label of {nid}",
        "description": f"made from a prompt of {len(user)} characters",
        "type": "semantic" if pass_ == "output" else "token-pattern",
        "interpretability": "medium"}


def agent_step(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The scripted investigator (requests with ``tools``): its next assistant message,
    decided by how far the conversation is. It reads the exemplars, sends one call whose
    arguments are not JSON and two that fail (a missing module; a count that is not a
    number, which the tool fails on), states the
    hypothesis that the neuron fires on the commonest peak token of its top exemplars,
    runs a prompt with that token and one without, and finishes with a verdict that
    follows from the two activations."""
    neuron = re.search(r"Investigate (L\d+/N\d+)", messages[1]["content"]).group(1)
    step = sum(m["role"] == "assistant" for m in messages)
    results = [json.loads(m["content"]) for m in messages if m["role"] == "tool"]

    def call(name: str, args: Any) -> dict[str, Any]:
        raw = args if isinstance(args, str) else json.dumps(args)
        return {"role": "assistant", "content": None, "tool_calls": [{
            "id": f"call_{step}", "type": "function",
            "function": {"name": name, "arguments": raw}}]}

    exemplars = next((r for r in results if "top" in r), None)
    peaks = [e["token"] for e in (exemplars or {}).get("top", [])]
    trigger = max(set(peaks), key=peaks.count) if peaks else None
    if step == 0:
        return call("exemplars", {"neuron": neuron, "top": 5})
    if step == 1:
        return call("activations", '{"neuron": "' + neuron + '", "prompts": [')  # cut off
    if step == 2:
        return call("cluster", {"path": "99:99"})
    if step == 3:
        return call("exemplars", {"neuron": neuron, "top": "many"})
    if step == 4:
        return {"role": "assistant", "content": "Let me think about the exemplars first."}
    if step == 5:
        return call("hypothesis", {"statement": f'fires on the token "{trigger}"'})
    if step == 6:
        plain = "w1 w2 w3 w4"
        return call("activations", {"neuron": neuron, "prompts": [
            f"w1 w2 {trigger} w3", plain]})
    found = results[-1].get("results")  # None: the experiment was refused
    fires = found is not None and found[0]["max"] > 0.5 and found[0]["max"] > 4 * abs(
        found[1]["max"])
    return call("finish", {"verdict": f'fires on the token "{trigger}"' if fires
                           else "no clear trigger", "confidence": 0.9 if fires else 0.2})


class LLMServer:
    def __init__(self, hang_s: float = 5.0) -> None:
        self.faults: dict[str, list[str]] = {}
        self.requests: list[dict[str, Any]] = []
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.hang_s = hang_s
        self.delay_s = 0.0
        self.refuse_logprobs = False
        # neuron id -> labels answered by the request's seed (best-of-N samples)
        self.candidates: dict[str, list[str]] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: Any, raw: bool = False) -> None:
                data = body if raw else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/octet-stream" if raw
                                 else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                if self.path.endswith("/chat/completions"):
                    code, out = server.chat(json.loads(body))
                    if code == 0:  # hang: answer nothing until the client gives up
                        time.sleep(server.hang_s)
                        return
                    self._send(code, out)
                elif self.path.endswith("/embeddings"):
                    self._send(200, server.embed(json.loads(body)))
                elif self.path.endswith("/files"):
                    self._send(200, server.upload(self.headers["Content-Type"], body))
                elif self.path.endswith("/batches"):
                    self._send(200, server.create_batch(json.loads(body)))
                else:
                    self._send(404, {"error": {"message": "no such route"}})

            def do_GET(self) -> None:  # noqa: N802
                m = re.search(r"/batches/([^/]+)$", self.path)
                if m:
                    self._send(200, server.poll_batch(m.group(1)))
                    return
                m = re.search(r"/files/([^/]+)/content$", self.path)
                if m:
                    self._send(200, server.files[m.group(1)], raw=True)
                    return
                self._send(404, {"error": {"message": "no such route"}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> LLMServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # chat ----------------------------------------------------------------------------

    def completion(self, content: str, n_prompt: int) -> dict[str, Any]:
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:8]}", "object": "chat.completion",
                "created": int(time.time()), "model": "fake",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": 20,
                          "total_tokens": n_prompt + 20}}

    def chat(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if body.get("tools"):
            return self.agent(body)
        name = ((body.get("response_format") or {}).get("json_schema") or {}).get("name", "")
        if name.endswith("_score"):
            return self.score(name.removesuffix("_score"), body)
        nid, pass_, fields = answer(body["messages"])
        if nid in self.candidates:
            options = self.candidates[nid]
            fields["label"] = options[(body.get("seed") or 0) % len(options)]
        with self.lock:
            faults = self.faults.get(f"{pass_}:{nid}") or self.faults.get(nid) or []
            fault = faults.pop(0) if faults else None
            self.requests.append({"neuron": nid, "pass": pass_, "fault": fault,
                                  "prompt": body["messages"][-1]["content"],
                                  "sampling": {k: body[k] for k in ("temperature", "seed")
                                               if k in body}})
        if self.delay_s:
            time.sleep(self.delay_s)
        n_prompt = sum(len(m["content"]) for m in body["messages"]) // 4
        if fault == "429":
            return 429, {"error": {"message": "rate limited", "type": "rate_limit"}}
        if fault == "500":
            return 500, {"error": {"message": "server error", "type": "server_error"}}
        if fault == "hang":
            return 0, {}
        if fault == "malformed":
            return 200, self.completion("this is not JSON {", n_prompt)
        if fault == "invalid":
            return 200, self.completion(json.dumps({**fields, "type": "vibes"}), n_prompt)
        if fault in HYGIENE:  # valid JSON whose label is not a label
            return 200, self.completion(json.dumps({**fields, "label": HYGIENE[fault]}),
                                        n_prompt)
        return 200, self.completion(json.dumps(fields), n_prompt)

    def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        """Bag-of-words embeddings: each lower-cased word of a text adds 1 to the
        dimension its CRC picks (of 64), so texts sharing words are near."""
        import zlib

        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        with self.lock:
            self.requests.append({"embed": len(texts)})
        data = []
        for i, text in enumerate(texts):
            v = [0.0] * 64
            for word in re.findall(r"[a-z0-9]+", text.lower()):
                v[zlib.crc32(word.encode()) % 64] += 1.0
            data.append({"object": "embedding", "index": i, "embedding": v})
        return {"object": "list", "data": data, "model": body["model"],
                "usage": {"prompt_tokens": 1, "total_tokens": 1}}

    def agent(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """The scripted investigator's reply; faults by step ("agent:4": ["500"])."""
        step = sum(m["role"] == "assistant" for m in body["messages"])
        with self.lock:
            faults = self.faults.get(f"agent:{step}") or []
            fault = faults.pop(0) if faults else None
            self.requests.append({"agent": step, "fault": fault,
                                  "tools": [t["function"]["name"] for t in body["tools"]]})
        if fault == "500":
            return 500, {"error": {"message": "server error", "type": "server_error"}}
        if self.delay_s:
            time.sleep(self.delay_s)
        message = agent_step(body["messages"])
        n_prompt = sum(len(json.dumps(m)) for m in body["messages"]) // 4
        return 200, {"id": f"chatcmpl-{uuid.uuid4().hex[:8]}", "object": "chat.completion",
                     "created": int(time.time()), "model": "fake",
                     "choices": [{"index": 0, "message": message, "finish_reason":
                                  "tool_calls" if message.get("tool_calls") else "stop"}],
                     "usage": {"prompt_tokens": n_prompt, "completion_tokens": 30,
                               "total_tokens": n_prompt + 30}}

    def score(self, scorer: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        user = body["messages"][-1]["content"]
        label = user.split("\n", 1)[0].removeprefix("Description: ")
        with self.lock:
            faults = self.faults.get(f"{scorer}:{label}") or []
            fault = faults.pop(0) if faults else None
            self.requests.append({"neuron": label, "pass": scorer, "fault": fault,
                                  "prompt": user, "logprobs": bool(body.get("logprobs"))})
        if body.get("logprobs") and self.refuse_logprobs:
            return 400, {"error": {"message": "logprobs are not supported by this model",
                                   "type": "invalid_request_error"}}
        reply = score_answer(scorer, user)
        if fault == "500":
            return 500, {"error": {"message": "server error", "type": "server_error"}}
        if fault == "malformed":
            return 200, self.completion("[true, false", 100)
        if fault == "short":  # one answer too few
            key = next(iter(reply))
            reply = {**reply, key: reply[key][:-1]}
        content = json.dumps(reply)
        out = self.completion(content, len(user) // 4)
        if body.get("logprobs"):
            out["choices"][0]["logprobs"] = {"content": logprob_tokens(content),
                                             "refusal": None}
        return 200, out

    def answered(self, pass_: str | None = None) -> list[str]:
        """Neurons given a valid answer, in order (repeats included)."""
        return [r["neuron"] for r in self.requests
                if r["fault"] is None and (pass_ is None or r["pass"] == pass_)]

    # files and batches ---------------------------------------------------------------

    def upload(self, content_type: str, body: bytes) -> dict[str, Any]:
        boundary = content_type.split("boundary=")[1].encode()
        data = b""
        for part in body.split(b"--" + boundary):
            head, _, rest = part.partition(b"\r\n\r\n")
            if b'name="file"' in head:
                data = rest.rsplit(b"\r\n", 1)[0]
        fid = f"file-{uuid.uuid4().hex[:8]}"
        self.files[fid] = data
        return {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": "batch.jsonl", "purpose": "batch", "status": "processed"}

    def create_batch(self, body: dict[str, Any]) -> dict[str, Any]:
        bid = f"batch_{uuid.uuid4().hex[:8]}"
        lines = []
        for line in self.files[body["input_file_id"]].decode().splitlines():
            req = json.loads(line)
            code, out = self.chat(req["body"])
            lines.append(json.dumps({"id": f"req-{uuid.uuid4().hex[:6]}",
                                     "custom_id": req["custom_id"],
                                     "response": {"status_code": code, "body": out},
                                     "error": None}))
        out_id = f"file-{uuid.uuid4().hex[:8]}"
        self.files[out_id] = "\n".join(lines).encode()
        self.batches[bid] = {"id": bid, "object": "batch", "endpoint": body["endpoint"],
                             "input_file_id": body["input_file_id"],
                             "completion_window": body["completion_window"],
                             "status": "validating", "created_at": int(time.time()),
                             "output_file_id": None, "_output": out_id, "_polls": 0,
                             "request_counts": {"total": len(lines), "completed": len(lines),
                                                "failed": 0}}
        return self._public(bid)

    def poll_batch(self, bid: str) -> dict[str, Any]:
        b = self.batches[bid]
        b["_polls"] += 1
        if b["_polls"] >= 2:
            b["status"], b["output_file_id"] = "completed", b["_output"]
        else:
            b["status"] = "in_progress"
        return self._public(bid)

    def _public(self, bid: str) -> dict[str, Any]:
        return {k: v for k, v in self.batches[bid].items() if not k.startswith("_")}
