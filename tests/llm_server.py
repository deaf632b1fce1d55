"""A small OpenAI-compatible HTTP server for the labeling tests, on 127.0.0.1.

It answers chat completions deterministically from the prompt (the label names the
neuron and pass), serves files and batches for the Batch API, records every request,
and can be told to misbehave per neuron: "429", "500", "hang", "malformed" (not
JSON), "invalid" (JSON that breaks the schema), "reasoning", "nonanswer", "essay" (valid
JSON whose label is not a label). The client under test is the real
``openai`` package talking HTTP to it.
"""

from __future__ import annotations

import json
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
           "essay": " ".join(["fires"] * 30)}


def answer(messages: list[dict[str, str]]) -> tuple[str, str, dict[str, Any]]:
    """(neuron or cluster id, pass, label fields) for a labeling prompt."""
    user = messages[-1]["content"]
    cluster = re.match(r"Cluster (\S+), (\d+) labelled", user)
    if cluster:
        return f"C{cluster.group(1)}", "cluster", {
            "label": f"cluster {cluster.group(1)} of {cluster.group(2)}", "coherence": 0.75}
    nid = NEURON.search(user).group(1)
    pass_ = "output" if "DOES" in messages[0]["content"] else "input"
    return nid, pass_, {
        "label": f"{pass_} label of {nid}",
        "description": f"made from a prompt of {len(user)} characters",
        "type": "semantic" if pass_ == "output" else "token-pattern",
        "interpretability": "medium"}


class LLMServer:
    def __init__(self, hang_s: float = 5.0) -> None:
        self.faults: dict[str, list[str]] = {}
        self.requests: list[dict[str, Any]] = []
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.hang_s = hang_s
        self.delay_s = 0.0
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
        nid, pass_, fields = answer(body["messages"])
        with self.lock:
            faults = self.faults.get(f"{pass_}:{nid}") or self.faults.get(nid) or []
            fault = faults.pop(0) if faults else None
            self.requests.append({"neuron": nid, "pass": pass_, "fault": fault,
                                  "prompt": body["messages"][-1]["content"]})
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
