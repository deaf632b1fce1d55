"""Labeling neurons with an LLM behind any OpenAI-compatible endpoint.

The official ``openai`` client talks to ``base_url`` (OpenAI, vLLM, Ollama, ...);
its own retries give exponential backoff on 429, 5xx and timeouts. Every reply is
asked for as structured output (a JSON schema) and validated; one that does not parse
or validate is asked once more, then recorded as a failure with the reason, never
stored as a label.

Resumable: each answer is appended to a journal file and fsync'd the moment it
arrives; at the end of each layer (and at the start of any run) journals are folded
into the ``labels`` table. A rerun skips every neuron that has an ok label for the
same pass, labeler and prompt, so killing a run at any instant loses no answer that
was recorded, and no recorded neuron is asked again.

``batch=True`` sends a layer as one OpenAI Batch API job (half the price): the
requests go up as a JSONL file, the batch is polled, its output downloaded and
validated; a batch's id is journaled, so a resumed run polls it instead of paying
twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel, Field, ValidationError

from circuit_atlas.analysis.label_prompts import Atlas, assemble, layer_evidence, layer_order
from circuit_atlas.analysis.labels import append_labels, known_labels, latest_ok
from circuit_atlas.analysis.params import LabelParams
from circuit_atlas.errors import CircuitAtlasError
from circuit_atlas.lake import Lake, layout
from circuit_atlas.lake.records import write_json_atomic
from circuit_atlas.lake.schemas import LABELS
from circuit_atlas.stage import Progress, Report, as_corpora, open_lake


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


@dataclass
class LabelReport:
    pass_: str
    asked: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    layers: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def answered(self, ok: bool) -> None:
        self.asked += 1
        self.ok += ok
        self.failed += not ok

    def cost(self, s: LLMSettings) -> float:
        factor = 0.5 if s.batch else 1.0
        return factor * (self.prompt_tokens * s.price_in
                         + self.completion_tokens * s.price_out) / 1e6


# journal ----------------------------------------------------------------------------


def _journal_dir(lake: Lake, model: str, corpus: str) -> str:
    return lake.path(f"{layout.LOG}/journal/labels/model={layout.model_key(model)}/"
                     f"corpus={corpus}")


class Journal:
    """Every answer as it arrives, through the lake's filesystem.

    On a local filesystem: one JSONL file per run, each line fsync'd as it is written,
    so a kill loses no answer. Elsewhere (object stores cannot append): answers are
    written in parts of ``FLUSH_ROWS`` or every ``FLUSH_S`` seconds, each part a new
    file, so a kill loses at most the answers since the last part."""

    FLUSH_ROWS, FLUSH_S = 32, 10.0

    def __init__(self, lake: Lake, model: str, corpus: str) -> None:
        from fsspec.implementations.local import LocalFileSystem

        self.fs, self.dir = lake.fs, _journal_dir(lake, model, corpus)
        self.fs.makedirs(self.dir, exist_ok=True)
        self.run = f"run-{uuid.uuid4().hex[:12]}"
        self.local = isinstance(self.fs, LocalFileSystem)
        self._pending: list[str] = []
        self._parts, self._last = 0, time.monotonic()
        self._f = open(f"{self.dir}/{self.run}.jsonl", "a", encoding="utf-8") if (  # noqa: SIM115
            self.local) else None

    def write(self, row: dict[str, Any]) -> None:
        line = json.dumps(row) + "\n"
        if self._f is not None:
            self._f.write(line)
            self._f.flush()
            os.fsync(self._f.fileno())
            return
        self._pending.append(line)
        if (len(self._pending) >= self.FLUSH_ROWS
                or time.monotonic() - self._last >= self.FLUSH_S):
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            path = f"{self.dir}/{self.run}-{self._parts:06d}.jsonl"
            tmp = layout.tmp_name(path, uuid.uuid4().hex[:8])
            with self.fs.open(tmp, "wb") as f:
                f.write("".join(self._pending).encode("utf-8"))
            self.fs.mv(tmp, path)
            self._pending, self._parts = [], self._parts + 1
        self._last = time.monotonic()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        else:
            self._flush()


def fold_journals(lake: Lake, model: str, corpus: str) -> int:
    """Move every journaled answer into the labels table (one batch); rows moved."""
    fs, d = lake.fs, _journal_dir(lake, model, corpus)
    if not fs.exists(d):
        return 0
    paths = sorted(p for p in fs.ls(d, detail=False) if p.endswith(".jsonl")
                   and layout.TMP_MARK not in p)
    rows = []
    for p in paths:
        with fs.open(p, "rb") as f:
            for line in f.read().decode("utf-8").splitlines():
                # a line cut by a kill is an answer that was not recorded
                with contextlib.suppress(json.JSONDecodeError):
                    rows.append(json.loads(line))
    if rows:
        schema = pl.from_arrow(LABELS.schema.empty_table()).schema
        append_labels(lake, model, corpus, pl.DataFrame(rows, schema=schema))
    for p in paths:
        fs.rm(p)
    return len(rows)


def _row(layer: int, neuron: int, pass_: str, labeler: str, phash: str,
         parsed: dict[str, Any] | None, error: str | None) -> dict[str, Any]:
    return {"layer": layer, "neuron": neuron, "pass": pass_,
            "label": parsed["label"] if parsed else None,
            "description": parsed["description"] if parsed else None,
            "type": parsed["type"] if parsed else None,
            "interpretability": parsed["interpretability"] if parsed else None,
            "labeler": labeler, "prompt_hash": phash, "status": "ok" if parsed else "failed",
            "error": error, "created_at": dt.datetime.now(dt.UTC).isoformat(
                timespec="microseconds")}


# asking -----------------------------------------------------------------------------


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


async def ask(client: Any, settings: LLMSettings, pass_: str, msgs: list[dict[str, str]],
              report: LabelReport) -> tuple[dict[str, Any] | None, str | None]:
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
            report.prompt_tokens += resp.usage.prompt_tokens or 0
            report.completion_tokens += resp.usage.completion_tokens or 0
        parsed, error = validate(pass_, resp.choices[0].message.content)
        if parsed is not None:
            return parsed, None
    return None, error


async def _ask_layer(settings: LLMSettings, pass_: str, layer: int,
                     todo: list[tuple[int, list[dict[str, str]], str]], journal: Journal,
                     report: LabelReport, tick: Callable[[], None]) -> None:
    client = settings.client()
    gate = asyncio.Semaphore(settings.concurrency)

    async def one(neuron: int, msgs: list[dict[str, str]], phash: str) -> None:
        async with gate:
            parsed, error = await ask(client, settings, pass_, msgs, report)
        journal.write(_row(layer, neuron, pass_, settings.model, phash, parsed, error))
        report.answered(parsed is not None)
        tick()

    try:
        await asyncio.gather(*(one(*t) for t in todo))
    finally:
        await client.close()


def _batch_layer(settings: LLMSettings, pass_: str, layer: int,
                 todo: list[tuple[int, list[dict[str, str]], str]], journal: Journal,
                 report: LabelReport, tick: Callable[[], None], state_path: str) -> None:
    """One layer through the Batch API; the batch id survives a kill in ``state_path``
    (on the journal's filesystem)."""
    fs = journal.fs
    client = settings.client(async_=False)
    by_id = {f"L{layer}/N{n}": (n, msgs, phash) for n, msgs, phash in todo}
    state = None
    if fs.exists(state_path):
        with fs.open(state_path, "rb") as f:
            state = json.loads(f.read())
    if state is None or set(state["ids"]) != set(by_id):
        lines = [json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                             "body": {"model": settings.model, "messages": msgs,
                                      "response_format": response_format(pass_)}})
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
            usage = body.get("usage") or {}
            report.prompt_tokens += usage.get("prompt_tokens", 0)
            report.completion_tokens += usage.get("completion_tokens", 0)
            try:
                answers[item["custom_id"]] = body["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                errors[item["custom_id"]] = f"batch item error: {item.get('error')}"
    retry = []
    for cid, (n, msgs, phash) in by_id.items():
        parsed, error = validate(pass_, answers.get(cid)) if cid in answers else (
            None, errors.get(cid, "missing from the batch output"))
        if parsed is None and cid in answers:
            retry.append((n, msgs, phash))  # a reply that does not validate: ask once more
            continue
        journal.write(_row(layer, n, pass_, settings.model, phash, parsed, error))
        report.answered(parsed is not None)
        tick()
    if retry:
        asyncio.run(_ask_layer(settings, pass_, layer, retry, journal, report, tick))
    fs.rm(state_path)


# the run ---------------------------------------------------------------------------


def label_lake(lake: Lake, model: str, corpus: str, pass_: str, settings: LLMSettings | None,
               layers: list[int] | None = None, per_layer: int | None = None,
               only_failed: bool = False, tokenizer: Any = None,
               on_progress: Callable[[int, int, int], None] | None = None) -> LabelReport:
    """Label the neurons of (model, corpus) for ``pass_``, layer by layer in the pass's
    order. ``settings`` None: a dry run that writes every assembled prompt to the
    ``label_prompts`` table instead. ``per_layer``: only the N neurons of each layer
    that are in the most graphs."""
    t0 = time.perf_counter()
    report = LabelReport(pass_)
    fold_journals(lake, model, corpus)
    atlas = Atlas.open(lake, model, corpus, tokenizer)
    order = [x for x in layer_order(pass_, atlas.n_layers) if layers is None or x in layers]
    dry_rows: list[dict[str, Any]] = []
    for layer in order:
        labels = known_labels(lake, model, corpus)
        neurons = None
        if per_layer is not None:
            neurons = atlas.neurons.filter(pl.col("layer") == layer).sort(
                ["graph_count", "neuron"], descending=[True, False]).head(per_layer)[
                "neuron"].to_list()
        prompts = assemble(pass_, layer_evidence(atlas, pass_, layer, latest_ok(labels),
                                                 neurons))
        report.layers.append(layer)
        if settings is None:
            dry_rows += [{"layer": layer, "neuron": n, "pass": pass_, "prompt_hash": h,
                          "system_message": m[0]["content"],
                          "user_message": m[1]["content"]}
                         for n, m, h in prompts]
            continue
        todo = _todo(prompts, labels, layer, pass_, settings.model, only_failed)
        report.skipped += len(prompts) - len(todo)
        if not todo:
            continue
        journal = Journal(lake, model, corpus)
        done = [0]

        def tick(layer=layer, todo=todo, done=done) -> None:
            done[0] += 1
            if on_progress:
                on_progress(layer, done[0], len(todo))

        try:
            if settings.batch:
                state = f"{_journal_dir(lake, model, corpus)}/batch-{pass_}-L{layer}.json"
                _batch_layer(settings, pass_, layer, todo, journal, report, tick, state)
            else:
                asyncio.run(_ask_layer(settings, pass_, layer, todo, journal, report, tick))
        finally:
            journal.close()
        fold_journals(lake, model, corpus)  # the next layer's prompts show these labels
    if settings is None:
        _write_prompts(lake, model, corpus, pass_, dry_rows)
    report.seconds = time.perf_counter() - t0
    return report


def _todo(prompts, labels: pl.DataFrame | None, layer: int, pass_: str, labeler: str,
          only_failed: bool):
    if labels is None:
        return [] if only_failed else prompts
    mine = labels.filter((pl.col("layer") == layer) & (pl.col("pass") == pass_)
                         & (pl.col("labeler") == labeler))
    ok = set(mine.filter(pl.col("status") == "ok").select("neuron", "prompt_hash").iter_rows())
    if only_failed:  # neurons whose latest answer failed, whatever their prompt is now
        latest = mine.sort("created_at").unique("neuron", keep="last")
        failed = set(latest.filter(pl.col("status") == "failed")["neuron"])
        return [p for p in prompts if p[0] in failed]
    return [p for p in prompts if (p[0], p[2]) not in ok]


def _write_prompts(lake: Lake, model: str, corpus: str, pass_: str,
                   rows: list[dict[str, Any]]) -> None:
    from circuit_atlas.lake.derived import add_part

    df = pl.DataFrame(rows, schema={"layer": pl.Int16, "neuron": pl.Int32, "pass": pl.String,
                                    "prompt_hash": pl.String, "system_message": pl.String,
                                    "user_message": pl.String})
    add_part(lake, model, corpus, "label_prompts", f"{pass_}.parquet", df.to_arrow(),
             {"model": model})


def label_clusters(lake: Lake, model: str, corpus: str, settings: LLMSettings,
                   method: str = "infomap", max_level: int = 2, min_labelled: int = 3,
                   members: int = 30) -> LabelReport:
    """Name each cluster (levels 1..``max_level``) with at least ``min_labelled``
    output-labelled members from up to ``members`` of their labels (by flow), as
    Transluce groups neuron descriptions; clusters already named from the same prompt
    are skipped."""
    from circuit_atlas.analysis.label_prompts import prompt_hash
    from circuit_atlas.analysis.templates import cluster_messages
    from circuit_atlas.lake.schemas import CLUSTER_LABELS

    t0 = time.perf_counter()
    report = LabelReport("cluster")
    labels = latest_ok(known_labels(lake, model, corpus))
    if labels is None or labels.filter(pl.col("pass") == "output").is_empty():
        raise CircuitAtlasError("no output labels yet: run circuit-atlas label --pass output")
    if lake.table_manifest(model, corpus, "cluster_assignments") is None:
        raise CircuitAtlasError("no clustering yet: run circuit-atlas cluster")
    assigned = lake.table("cluster_assignments", model, corpus).filter(
        pl.col("method") == method).collect().join(
        labels.filter(pl.col("pass") == "output").select("layer", "neuron", "label"),
        on=["layer", "neuron"])
    todo = []
    done = set()
    if lake.table_manifest(model, corpus, "cluster_labels") is not None:
        done = set(lake.table("cluster_labels", model, corpus).filter(
            (pl.col("status") == "ok") & (pl.col("labeler") == settings.model)).select(
            "cluster_path", "prompt_hash").collect().iter_rows())
    for level in range(1, max_level + 1):
        with_prefix = assigned.filter(pl.col("depth") >= level).with_columns(
            prefix=pl.col("cluster_path").str.split(":").list.head(level).list.join(":"))
        for (path,), group in with_prefix.group_by("prefix", maintain_order=True):
            if len(group) < min_labelled:
                continue
            top = group.sort("flow", descending=True).head(members)
            msgs = cluster_messages(path, [(f"L{a}/N{b}", c) for a, b, c in zip(
                top["layer"], top["neuron"], top["label"], strict=True)])
            h = prompt_hash(msgs)
            if (path, h) in done:
                report.skipped += 1
                continue
            todo.append((path, msgs, h, len(group)))

    async def run() -> list[dict[str, Any]]:
        client = settings.client()
        gate = asyncio.Semaphore(settings.concurrency)

        async def one(path, msgs, h, n):
            async with gate:
                parsed, error = await ask(client, settings, "cluster", msgs, report)
            report.answered(parsed is not None)
            return {"method": method, "cluster_path": path,
                    "label": parsed["label"] if parsed else None,
                    "coherence": parsed["coherence"] if parsed else None,
                    "members_labelled": n, "labeler": settings.model, "prompt_hash": h,
                    "status": "ok" if parsed else "failed", "error": error,
                    "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")}

        try:
            return await asyncio.gather(*(one(*t) for t in todo))
        finally:
            await client.close()

    rows = asyncio.run(run()) if todo else []
    if rows:
        from circuit_atlas.lake.derived import add_part

        df = pl.DataFrame(rows, schema=pl.from_arrow(CLUSTER_LABELS.schema.empty_table()).schema)
        add_part(lake, model, corpus, "cluster_labels", f"batch-{uuid.uuid4().hex[:12]}.parquet",
                 df.to_arrow(), {"model": model})
    report.seconds = time.perf_counter() - t0
    return report


@dataclass
class LabelsReport(Report):
    corpus: str
    passes: list[LabelReport]
    clusters: LabelReport | None
    settings: LLMSettings | None

    def __str__(self) -> str:
        lines = []
        s = self.settings
        for r in self.passes:
            if s is None:
                lines.append(f"label prompts {r.pass_}: layers {r.layers[0]}..{r.layers[-1]} "
                             "assembled into the label_prompts table (dry run, no LLM)")
                continue
            lines.append(
                f"labels {r.pass_}: {r.ok:,} ok, {r.failed:,} failed, {r.skipped:,} already "
                f"labelled; {r.prompt_tokens:,} prompt + {r.completion_tokens:,} completion "
                f"tokens, ${r.cost(s):.4f}{' (batch price)' if s.batch else ''}; "
                f"{r.seconds:.1f} s")
        if self.clusters is not None and s is not None:
            c = self.clusters
            lines.append(f"cluster labels: {c.ok:,} ok, {c.failed:,} failed, {c.skipped:,} "
                         f"already named; ${c.cost(s):.4f}")
        return "\n".join(lines)


def run_labels(lake, *, model, corpora=None, params: LabelParams | None = None,
               cluster=None, progress: Progress | None = None) -> LabelsReport:
    """Label every neuron of a reduce (``corpora``: default the only one) twice with an
    LLM: the output pass (what it does; late layers first, showing its targets'
    labels) and the input pass (what triggers it; early layers first, showing its
    sources' labels), then name the clusters. Resumable: a rerun asks only what is
    missing or failed. ``params.dry_run`` assembles the prompts without an LLM."""
    from circuit_atlas.compute.models import optional_tokenizer
    from circuit_atlas.compute.names import model_name

    lake, params = open_lake(lake), params or LabelParams()
    progress = progress or Progress()
    spec, model = model, model_name(model)
    corpus = lake.reduced_corpus(model, as_corpora(corpora))
    settings = params.settings()
    tokenizer = optional_tokenizer(spec)
    reports = []
    for pass_ in params.passes:
        task = f"{'prompts' if settings is None else 'label'} {pass_}"
        reports.append(label_lake(
            lake, model, corpus, pass_, settings, layers=list(params.layers) or None,
            per_layer=params.per_layer, only_failed=params.only_failed, tokenizer=tokenizer,
            on_progress=lambda layer, d, t, task=task: progress.update(
                f"{task} L{layer}", d, t)))
    named = None
    if settings is not None and params.name_clusters and lake.table_manifest(
            model, corpus, "cluster_assignments") is not None:
        progress.update("naming the clusters", 0, None)
        named = label_clusters(lake, model, corpus, settings, params.cluster_method)
    return LabelsReport(corpus, reports, named, settings)
