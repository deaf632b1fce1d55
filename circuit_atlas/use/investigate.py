"""``investigate``: an agent that tests hypotheses about one neuron.

An LLM behind any OpenAI-compatible endpoint with tool calling is given the neuron and
the questions of the MCP server (:class:`~circuit_atlas.use.mcp.AtlasTools`: profile,
exemplars, label search, neighbours, clusters, SQL; and on the model itself
``activations`` of new prompts, ``intervene`` and ``steer``), plus two of its own:
``hypothesis`` (state one, to be tested) and ``finish`` (the verdict and a confidence).
It is asked to design prompts that should and should not activate the neuron, run
them, and conclude.

Every step (each reply of the LLM, each tool's answer) is appended to the
investigation's journal the moment it exists, so a killed run resumes where it stopped
and asks nothing twice. Budgets: tool calls, tokens (prompt and completion), wall time
and runs of the model. The record (hypotheses, experiments with their results, the
verdict) goes to the ``investigations`` table, and the neuron's report page shows it.

A reply the agent gets wrong does not end the investigation: arguments that are not
JSON, an unknown tool or a tool that fails answer the call with the error, for the
agent to correct.
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
import time
import typing
import uuid
from dataclasses import dataclass, field
from typing import Any

from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.stage import Report

# the atlas's questions the agent may ask (AtlasTools methods), and its own two
ATLAS_TOOLS = ("profile", "exemplars", "search_labels", "neighbours", "cluster", "sql")
MODEL_TOOLS = ("activations", "intervene", "steer")
RESULT_CHARS = 6000  # a tool's answer as the agent reads it, at most
JOURNAL = "investigations"

SYSTEM = """You are an interpretability researcher investigating one MLP neuron of a \
language model: {neuron} of {model}. Find out what makes it activate and what it does.

Work in steps. Look at the evidence the atlas holds (profile, exemplars: its top and \
bottom contexts, with <<marked>> tokens where it fires). State each hypothesis with the \
hypothesis tool before you test it. Test it with the activations tool: prompts you \
design that should activate the neuron and prompts that should not (change one thing \
at a time), and, if it helps, intervene (ablate or boost the neuron on a prompt and \
see what happens to the next token). Revise the hypothesis when a result contradicts \
it. When you are done, call finish with a one-sentence verdict on what the neuron \
responds to (and does, if you found it) and your confidence between 0 and 1.

You have at most {tool_calls} tool calls and {model_calls} runs of the model \
(activations, intervene, steer)."""


def _json_type(annotation: Any) -> dict[str, Any]:
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1] or (str,)
        return {"type": "array", "items": _json_type(item)}
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _json_type(kinds[0])
    return {"type": {str: "string", int: "integer", float: "number", bool: "boolean"}.get(
        annotation, "string")}


def tool_spec(name: str, fn: Any, description: str | None = None) -> dict[str, Any]:
    """The OpenAI function-tool spec of ``fn``: its parameters from its signature and
    type hints, its description from its docstring."""
    hints = typing.get_type_hints(fn)
    props, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        if p.name == "self":
            continue
        props[p.name] = _json_type(hints.get(p.name, str))
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
        else:
            props[p.name]["default"] = p.default
    doc = " ".join((description or inspect.getdoc(fn) or name).split())
    return {"type": "function", "function": {
        "name": name, "description": doc,
        "parameters": {"type": "object", "properties": props, "required": required}}}


def hypothesis(statement: str) -> dict[str, Any]:
    """State a hypothesis about the neuron (one sentence), before you test it."""
    return {"recorded": statement}


def finish(verdict: str, confidence: float) -> dict[str, Any]:
    """End the investigation: a one-sentence verdict on what the neuron responds to
    (and does), and your confidence in it between 0 and 1."""
    if not isinstance(verdict, str) or not verdict.strip():
        raise CircuitAtlasError("finish needs a verdict: one sentence")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not (
            0 <= confidence <= 1):
        raise CircuitAtlasError("finish needs a confidence between 0 and 1")
    return {"verdict": verdict.strip(), "confidence": float(confidence)}


@dataclass
class State:
    """An investigation as its journal tells it."""

    investigation: str
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [s["message"] for s in self.steps]

    def count(self, key: str) -> int:
        return sum(int(s.get(key) or 0) for s in self.steps)

    @property
    def tool_calls(self) -> int:
        return sum(s["kind"] == "tool" for s in self.steps)

    @property
    def model_calls(self) -> int:
        return sum(bool(s.get("model_call")) for s in self.steps)

    @property
    def seconds(self) -> float:
        return sum(float(s.get("seconds") or 0.0) for s in self.steps)

    @property
    def hypotheses(self) -> list[str]:
        return [s["arguments"]["statement"] for s in self.steps if s["kind"] == "tool"
                and s["tool"] == "hypothesis" and s.get("error") is None]

    @property
    def finished(self) -> dict[str, Any] | None:
        for s in self.steps:
            if s["kind"] == "tool" and s["tool"] == "finish" and s.get("error") is None:
                return finish(**s["arguments"])  # the verdict as finish checked it
        return None

    def unanswered(self) -> list[dict[str, Any]]:
        """The tool calls of the last reply that have no answer yet (a kill between the
        reply and its answers)."""
        answered = {s["message"].get("tool_call_id") for s in self.steps
                    if s["kind"] == "tool"}
        for s in reversed(self.steps):
            if s["kind"] == "assistant":
                return [c for c in s["message"].get("tool_calls") or []
                        if c["id"] not in answered]
        return []

    def experiments(self) -> list[dict[str, Any]]:
        return [{k: s.get(k) for k in ("tool", "arguments", "result", "error")}
                for s in self.steps if s["kind"] == "tool"
                and s["tool"] not in ("hypothesis", "finish")]


def journal_folder(lake: Any, model: str, corpus: str) -> str:
    from circuit_atlas.labeling.journal import journal_dir

    return journal_dir(lake, model, corpus, JOURNAL)


def read_journal(lake: Any, path: str) -> list[dict[str, Any]]:
    """The steps of one investigation's journal (a line cut by a kill is a step that
    did not happen)."""
    from circuit_atlas.labeling.journal import read_jsonl

    return read_jsonl(lake.fs, path) if lake.fs.exists(path) else []


class StepJournal:
    """One investigation's steps, each appended and fsync'd as it happens (a lake on an
    object store rewrites the file per step: an investigation is tens of steps)."""

    def __init__(self, lake: Any, path: str, steps: list[dict[str, Any]]) -> None:
        from fsspec.implementations.local import LocalFileSystem

        self.lake, self.path, self.steps = lake, path, steps
        lake.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.local = isinstance(lake.fs, LocalFileSystem)

    def write(self, step: dict[str, Any]) -> None:
        import os

        self.steps.append(step)
        line = json.dumps(step, ensure_ascii=False) + "\n"
        if self.local:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        else:
            with self.lake.fs.open(self.path, "wb") as f:
                f.write("".join(json.dumps(s, ensure_ascii=False) + "\n"
                                for s in self.steps).encode("utf-8"))


@dataclass
class InvestigateReport(Report):
    neuron: str
    investigation: str
    status: str
    verdict: str | None
    confidence: float | None
    hypotheses: int
    tool_calls: int
    model_calls: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    resumed: int  # steps read back from the journal
    error: str | None = None
    cost: float = 0.0  # USD at --price-in / --price-out

    def __str__(self) -> str:
        head = (f"investigate {self.neuron} ({self.investigation}): {self.status}, "
                f"{self.hypotheses} hypothes{'is' if self.hypotheses == 1 else 'es'}, "
                f"{self.tool_calls} tool calls ({self.model_calls} runs of the model), "
                f"{self.prompt_tokens + self.completion_tokens:,} tokens, "
                f"{self.seconds:.1f} s" + (f", ${self.cost:.4f}" if self.cost else "")
                + (f", {self.resumed} steps resumed from the journal" if self.resumed else ""))
        if self.verdict is not None:
            conf = "" if self.confidence is None else f" (confidence {self.confidence:.2f})"
            head += f"\ninvestigate verdict{conf}: {self.verdict}"
        if self.error:
            head += f"\ninvestigate stopped: {self.error}"
        return head


class Investigator:
    """The loop: ask the LLM, answer its tool calls, journal every step, until it
    finishes or a budget runs out."""

    def __init__(self, tools: Any, params: Any, layer: int, neuron: int,
                 journal: StepJournal, state: State) -> None:
        self.tools, self.params = tools, params
        self.layer, self.neuron = layer, neuron
        self.journal, self.state = journal, state
        self.functions: dict[str, Any] = {n: getattr(tools, n) for n in ATLAS_TOOLS}
        if params.model_calls > 0:
            self.functions.update({n: getattr(tools, n) for n in MODEL_TOOLS})
        self.functions.update(hypothesis=hypothesis, finish=finish)
        self.specs = [tool_spec(n, f) for n, f in self.functions.items()]

    def opening(self) -> list[dict[str, Any]]:
        from circuit_atlas.lake.neurons import neuron_label

        name = neuron_label(self.layer, self.neuron)
        return [{"role": "system", "content": SYSTEM.format(
                    neuron=name, model=self.tools.model, tool_calls=self.params.max_tool_calls,
                    model_calls=self.params.model_calls)},
                {"role": "user", "content": f"Investigate {name}."}]

    def over_budget(self) -> str | None:
        p, s = self.params, self.state
        if s.tool_calls >= p.max_tool_calls:
            return f"the budget of {p.max_tool_calls} tool calls is spent"
        if s.count("prompt_tokens") + s.count("completion_tokens") >= p.max_tokens:
            return f"the budget of {p.max_tokens:,} tokens is spent"
        if s.seconds >= p.max_seconds:
            return f"the budget of {p.max_seconds:g} s is spent"
        if sum(st["kind"] == "assistant" for st in s.steps) >= 2 * p.max_tool_calls:
            return "the agent keeps answering without calling a tool"
        return None

    def call(self, call: dict[str, Any]) -> None:
        """Answer one tool call (journaled); a malformed or failing call answers its
        error."""
        t0 = time.monotonic()
        name, raw = call["function"]["name"], call["function"].get("arguments") or "{}"
        args: Any = None
        result, error, model_call = None, None, False
        try:
            args = json.loads(raw)
            if not isinstance(args, dict):
                raise ValueError("the arguments are not a JSON object")
        except ValueError as e:
            error = f"malformed arguments ({e}); send a JSON object"
        if error is None and name not in self.functions:
            error = f"no tool {name!r}; the tools are {', '.join(self.functions)}"
        if error is None:
            before = self.tools.budget
            try:
                result = self.functions[name](**args)
            except CircuitAtlasError as e:
                error = str(e)
            except TypeError as e:  # arguments the tool does not take
                error = f"bad arguments for {name}: {e}"
            except Exception as e:  # a failing tool is the agent's evidence, not the end
                error = f"{name} failed: {type(e).__name__}: {e}"
            model_call = self.tools.budget < before
        content = json.dumps({"error": error} if error else result, ensure_ascii=False,
                             default=str)[:RESULT_CHARS]
        self.journal.write({
            "kind": "tool", "tool": name, "arguments": args if isinstance(args, dict) else raw,
            "result": None if error else content, "error": error, "model_call": model_call,
            "seconds": time.monotonic() - t0,
            "message": {"role": "tool", "tool_call_id": call["id"], "content": content}})

    def ask(self, client: Any) -> str | None:
        """One reply of the LLM, journaled; None, or why it could not be had."""
        import openai

        t0 = time.monotonic()
        try:
            resp = client.chat.completions.create(
                model=self.params.llm, messages=self.opening() + self.state.messages,
                tools=self.specs, temperature=self.params.temperature)
        except (openai.AuthenticationError, openai.NotFoundError,
                openai.PermissionDeniedError) as e:
            raise CircuitAtlasError(f"the LLM endpoint refused: {e}") from e
        except openai.APIError as e:  # after the client's own retries with backoff
            return f"the LLM endpoint failed: {type(e).__name__}: {str(e)[:200]}"
        msg = resp.choices[0].message
        calls = [{"id": c.id, "type": "function",
                  "function": {"name": c.function.name, "arguments": c.function.arguments}}
                 for c in msg.tool_calls or []]
        message: dict[str, Any] = {"role": "assistant", "content": msg.content}
        if calls:
            message["tool_calls"] = calls
        usage = resp.usage
        self.journal.write({
            "kind": "assistant", "message": message, "seconds": time.monotonic() - t0,
            "prompt_tokens": getattr(usage, "prompt_tokens", 0) or 0,
            "completion_tokens": getattr(usage, "completion_tokens", 0) or 0})
        if not calls:  # prose: the agent is reminded how to go on
            self.journal.write({
                "kind": "note", "seconds": 0.0, "message": {
                    "role": "user", "content": "Go on with a tool call; call finish with "
                    "your verdict and confidence when you are done."}})
        return None

    def run(self, client: Any, progress: Any) -> tuple[str, str | None]:
        """(status, why it stopped early or None)."""
        while True:
            for call in self.state.unanswered():
                if self.state.finished is not None:
                    break
                if (why := self.over_budget()) is not None:
                    return "budget", why
                self.call(call)
                progress.update("tool calls", self.state.tool_calls, self.params.max_tool_calls)
            if self.state.finished is not None:
                return "done", None
            if (why := self.over_budget()) is not None:
                return "budget", why
            if (why := self.ask(client)) is not None:
                return "failed", why


def run_investigate(lake, *, model, neuron: str, corpora=None, params=None,
                    progress=None) -> InvestigateReport:
    """Investigate ``neuron`` (L12/N345) of the atlas of ``corpora`` (default: the only
    reduced set) with the LLM of ``params``; resumes the neuron's unfinished
    investigation from its journal (``params.again``: start a new one even after a
    verdict). The record goes to the investigations table."""
    import polars as pl

    from circuit_atlas.compute.models import LoadedModel
    from circuit_atlas.lake.derived import add_part
    from circuit_atlas.lake.investigations import records
    from circuit_atlas.lake.neurons import neuron_label, parse_neuron
    from circuit_atlas.lake.schemas import INVESTIGATIONS
    from circuit_atlas.names import model_name
    from circuit_atlas.stage import Progress, as_corpora, open_lake
    from circuit_atlas.use.mcp import AtlasTools
    from circuit_atlas.use.params import InvestigateParams

    lake, params = open_lake(lake), params or InvestigateParams()
    progress = progress or Progress()
    loaded = model if isinstance(model, LoadedModel) else None
    name = loaded.name if loaded else model_name(model)
    layer, index = parse_neuron(neuron)
    tools = AtlasTools(lake, name, as_corpora(corpora) or None,
                       interventions=params.model_calls,
                       model_spec=None if loaded else model, loaded=loaded)
    if tools.tokenizer is None and tools.model_spec is not None:
        from circuit_atlas.compute.models import optional_tokenizer

        tools.tokenizer = optional_tokenizer(tools.model_spec)
    folder = journal_folder(lake, name, tools.corpus)
    done = records(lake, name, tools.corpus)
    finished_ids = set() if done is None else set(done.filter(
        pl.col("status") != "failed")["investigation"])
    prefix = f"L{layer}-N{index}-"
    lake.fs.makedirs(folder, exist_ok=True)
    mine = sorted(p.rsplit("/", 1)[-1][:-len(".jsonl")] for p in lake.fs.ls(
        folder, detail=False) if p.rsplit("/", 1)[-1].startswith(prefix))
    ongoing = [i for i in mine if i not in finished_ids]
    if ongoing:
        inv = ongoing[-1]
    elif mine and not params.again:
        row = done.filter(pl.col("investigation") == mine[-1]).row(0, named=True)
        raise CircuitAtlasError(
            f"{neuron_label(layer, index)} was investigated ({mine[-1]}: {row['status']}, "
            f"verdict {row['verdict']!r}); --again starts a new investigation")
    else:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        inv = f"{prefix}{stamp}-{uuid.uuid4().hex[:6]}"
    path = f"{folder}/{inv}.jsonl"
    state = State(inv, read_journal(lake, path))
    resumed = len(state.steps)
    # a resumed investigation's runs of the model count against the same budget
    tools.budget = max(0, params.model_calls - state.model_calls)
    agent = Investigator(tools, params, layer, index, StepJournal(lake, path, state.steps),
                         state)
    client = params.llm_settings().client(async_=False)
    try:
        status, why = agent.run(client, progress)
    finally:
        client.close()
    verdict = state.finished or {}
    row = {"layer": layer, "neuron": index, "investigation": inv, "status": status,
           "verdict": verdict.get("verdict"), "confidence": verdict.get("confidence"),
           "hypotheses": state.hypotheses,
           "experiments": json.dumps(state.experiments(), ensure_ascii=False),
           "tool_calls": state.tool_calls, "model_calls": state.model_calls,
           "prompt_tokens": state.count("prompt_tokens"),
           "completion_tokens": state.count("completion_tokens"),
           "seconds": state.seconds, "investigator": params.llm, "error": why,
           "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")}
    import pyarrow as pa

    add_part(lake, name, tools.corpus, "investigations", f"{inv}.parquet",
             pa.Table.from_pylist([row], schema=INVESTIGATIONS.schema),
             {"model": name, "investigator": params.llm})
    return InvestigateReport(
        neuron_label(layer, index), inv, status, row["verdict"], row["confidence"],
        len(row["hypotheses"]), row["tool_calls"], row["model_calls"], row["prompt_tokens"],
        row["completion_tokens"], round(row["seconds"], 2), resumed, why,
        (row["prompt_tokens"] * params.price_in + row["completion_tokens"] * params.price_out)
        / 1e6)
