"""The label scorers: each turns a label and a neuron's held-out contexts
(``labeling.contexts``) into one request to a scorer LLM, and its reply into a score.

- **detection** (delphi's): the label and a shuffled mix of activating contexts and
  negatives (random and hard); the scorer says which activate. Balanced accuracy
  (the headline: 0.5 is chance whatever the mix), F1 and AUC (over the scorer's
  probability of "true" where the endpoint returns logprobs, else its answers).
- **fuzzing** (delphi's): every activating context twice, once with the tokens where
  the neuron fires marked ``<<so>>`` and once with as many marks moved to other tokens
  of it; the scorer says which marks fit the label. Balanced accuracy.
- **simulation** (OpenAI's): the scorer predicts the activation at every token on a
  0-10 scale from the label; Pearson's r against the true activations (clipped at 0,
  over the neuron's largest), pooled over every token of every context, as OpenAI's
  scorer pools them. The expected value over the scorer's logprobs where the endpoint
  returns them, else the sampled numbers.
- **intervention** (of output labels, from the causal battery): in each of
  :data:`ROUNDS` rounds the scorer sees :data:`CANDIDATES` token sets, one the tokens
  the neuron's boost raised most (``lake.causal.boost_tokens``), the others decoys
  (what other neurons' boosts raised, or other neurons' output projections where the
  battery measured too few), and says which one a neuron with the label pushes up.
  Accuracy over the rounds; chance is 1 / :data:`CANDIDATES`.

Prompts are deterministic (a seed from the neuron and the scorer), so a rerun asks
the same question and resumes by its hash.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from circuit_atlas.labeling import metrics
from circuit_atlas.labeling.client import Request
from circuit_atlas.labeling.contexts import Context

SCORERS = ("detection", "fuzzing", "simulation", "intervention")
ACTIVATION_SCORERS = SCORERS[:3]  # of what drives a neuron: input and prior labels
EFFECT_SCORERS = ("intervention",)  # of what a neuron does: output labels
ROUNDS, CANDIDATES = 3, 4
MARK = 0.5  # a token is marked where it reaches this share of the context's peak
SIM_CONTEXTS = 5  # positives and negatives each, simulated per neuron (OpenAI: 5 and 5)
SCALE = 10

SYSTEM = {
    "detection": (
        "You are scoring a description of a neuron in a language model. You get the "
        "description and numbered text excerpts. For each excerpt, in order, say whether "
        "the neuron activates somewhere in it (true) or not (false), judging from the "
        "description alone. Some excerpts are about related topics and still do not "
        "activate it."),
    "fuzzing": (
        "You are scoring a description of a neuron in a language model. You get the "
        "description and numbered text excerpts in which some tokens are marked between "
        "<< and >>. For each excerpt, in order, say whether the marked tokens are the ones "
        "where a neuron with this description would activate (true) or the marks are "
        "misplaced (false)."),
    "simulation": (
        "You are simulating a neuron in a language model from its description. For every "
        "token of every excerpt, predict the neuron's activation on a scale from 0 (none) "
        f"to {SCALE} (its strongest). Most tokens of most excerpts are 0. Answer with one "
        "list of integers per excerpt (excerpt_1, excerpt_2, ...), one integer per token, "
        "in order."),
    "intervention": (
        "You are checking a description of what a neuron in a language model does to the "
        "model's next-token predictions. When the neuron is boosted, some tokens become "
        "more likely. In each round you get numbered candidate sets of tokens; exactly one "
        "is the set this neuron's boost raises most. Judging from the description alone, "
        "answer with the number of that set for every round, in order."),
}
FIELD = {"detection": "activates", "fuzzing": "correct", "intervention": "choices"}
BOOLEAN_ITEM = {"type": "boolean"}


@dataclass
class Trial:
    """One scorer's request about one label: the messages, the reply's schema, and
    ``check(content, logprobs)`` -> (score fields, None) or (None, why the reply is not
    an answer)."""

    scorer: str
    messages: list[dict[str, str]]
    response_format: dict[str, Any]
    check: Callable[[str | None, list | None], tuple[dict[str, Any] | None, str | None]]
    positives: int
    negatives: int
    hard: int

    def request(self) -> Request:
        """The question, logprobs asked for (the scorers read them where given)."""
        return Request(self.messages, self.response_format, self.check, logprobs=True)


def seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:8],
                          "little")


def _schema(scorer: str, lengths: list[int], item: dict[str, Any] = BOOLEAN_ITEM
            ) -> dict[str, Any]:
    """The reply's JSON schema, with every count fixed (``lengths``: the excerpts'
    token counts; else one answer of ``item`` per entry), so a grammar-constrained
    scorer cannot answer the wrong number."""
    if scorer == "simulation":
        props: dict[str, Any] = {
            f"excerpt_{i + 1}": {"type": "array", "minItems": n, "maxItems": n,
                                 "items": {"type": "integer", "minimum": 0, "maximum": SCALE}}
            for i, n in enumerate(lengths)}
    else:
        props = {FIELD[scorer]: {"type": "array", "items": item,
                                 "minItems": len(lengths), "maxItems": len(lengths)}}
    schema = {"type": "object", "properties": props, "required": list(props),
              "additionalProperties": False}
    return {"type": "json_schema",
            "json_schema": {"name": f"{scorer}_score", "schema": schema, "strict": True}}


def _reply(scorer: str, content: str | None, lengths: list[int]
           ) -> tuple[list | None, str | None]:
    """The reply's answers (one per excerpt; for the simulation, one list of numbers
    per excerpt), or why it is not one."""
    if not content:
        return None, "empty reply"
    try:
        data = json.loads(content)
        got = ([data[f"excerpt_{i + 1}"] for i in range(len(lengths))]
               if scorer == "simulation" else data[FIELD[scorer]])
    except (json.JSONDecodeError, KeyError, TypeError):
        return None, "invalid reply (not a JSON object with the fields asked for)"
    if not isinstance(got, list) or len(got) != len(lengths):
        return None, (f"invalid reply ({len(got) if isinstance(got, list) else 0} answers "
                      f"for {len(lengths)} excerpts)")
    return got, None


def _user(label: str, excerpts: list[str]) -> str:
    body = "\n".join(f"{i + 1}. {e}" for i, e in enumerate(excerpts))
    return f"Description: {label}\n\nExcerpts:\n{body}"


def value_probs(logprobs: list | None, values: dict[str, float], n: int
                ) -> tuple[list[float], bool] | None:
    """Each of the ``n`` answers of a reply as the expected value over the alternatives
    the endpoint returned for its token (``top_logprobs`` that are answers too;
    ``values``: answer text -> value), and whether any answer got one. An answer
    spread over several tokens (a tokenizer that splits "10" into "1" "0") keeps its
    sampled value. None when the tokens do not spell ``n`` answers."""
    if not logprobs:
        return None
    tokens = [_get(t, "token") or "" for t in logprobs]
    text = "".join(tokens)
    ends = np.cumsum([len(t) for t in tokens])
    pattern = "|".join(sorted(map(re.escape, values), key=len, reverse=True))
    found = list(re.finditer(rf"(?<![\w.])({pattern})(?![\w.])", text))
    if len(found) != n:
        return None
    out, used = [], False
    for m in found:
        first = int(np.searchsorted(ends, m.start(), side="right"))
        last = int(np.searchsorted(ends, m.end() - 1, side="right"))
        if first != last or _answer_text(tokens[first]) != m.group(1):
            out.append(values[m.group(1)])  # several tokens: the sampled value
            continue
        weights: dict[str, float] = {}
        for alt in _get(logprobs[first], "top_logprobs") or []:
            a = _answer_text(_get(alt, "token"))
            if a in values and a not in weights:
                weights[a] = math.exp(_get(alt, "logprob"))
        if not weights:
            weights = {m.group(1): 1.0}
        used = True
        out.append(sum(values[a] * w for a, w in weights.items()) / sum(weights.values()))
    return out, used


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def _answer_text(token: str | None) -> str:
    return re.sub(r"^[\s\[\],:\"]+|[\s\[\],:\"]+$", "", token or "")


BOOLEAN = {"true": 1.0, "false": 0.0}
NUMBERS = {str(v): float(v) for v in range(SCALE + 1)}


def _fmt(v: float | None) -> float | None:
    return None if v is None else round(float(v), 6)


def detection(label: str, contexts: list[Context], texts: Callable[[list[int]], str],
              rng: np.random.Generator) -> Trial | None:
    pos = [c for c in contexts if c.positive]
    neg = [c for c in contexts if not c.positive]
    if not pos or not neg:
        return None
    shown = pos + neg
    order = rng.permutation(len(shown))
    shown = [shown[i] for i in order]
    truth = np.array([c.positive for c in shown])
    hard = np.array([c.kind == "hard" for c in shown])
    msgs = [{"role": "system", "content": SYSTEM["detection"]},
            {"role": "user", "content": _user(label, [texts(c.token_ids) for c in shown])}]

    def check(content: str | None, logprobs: list | None):
        said, probs, error = _booleans("detection", content, logprobs, len(shown))
        if said is None:
            return None, error
        score = np.array(probs) if probs is not None else said.astype(float)
        m = {"balanced_accuracy": metrics.balanced_accuracy(truth, said),
             "f1": metrics.f1(truth, said), "auc": metrics.auc(truth, score),
             "recall": float(said[truth].mean()),
             "random_negative_accuracy": _share(~said[~truth & ~hard]),
             "hard_negative_accuracy": _share(~said[hard]), "logprobs": probs is not None}
        return {"score": m["balanced_accuracy"], "metrics": m}, None

    return Trial("detection", msgs, _schema("detection", [1] * len(shown)), check, len(pos),
                 len(neg), int(hard.sum()))


def _booleans(scorer: str, content: str | None, logprobs: list | None, n: int
              ) -> tuple[np.ndarray | None, list[float] | None, str | None]:
    """A true/false reply's answers, the probability of each "true" where the logprobs
    give it, or why the reply is not one."""
    got, error = _reply(scorer, content, [1] * n)
    if got is None:
        return None, None, error
    if not all(isinstance(v, bool) for v in got):
        return None, None, f"invalid reply ({FIELD[scorer]}: not all true/false)"
    got_p = value_probs(logprobs, BOOLEAN, n)
    return np.array(got), got_p[0] if got_p and got_p[1] else None, None


def _share(x: np.ndarray) -> float | None:
    return None if len(x) == 0 else float(x.mean())


def marked_text(tokens: list[str], marks: set[int]) -> str:
    return "".join(f"<<{t}>>" if i in marks else t for i, t in enumerate(tokens))


def fuzzing(label: str, contexts: list[Context], texts: Callable[[list[int]], list[str]],
            rng: np.random.Generator) -> Trial | None:
    items, truth = [], []
    for c in (c for c in contexts if c.positive):
        peak = float(c.acts.max(initial=0.0))
        if peak <= 0:
            continue
        right = {int(i) for i in np.flatnonzero(c.acts >= MARK * peak)}
        others = [i for i in range(len(c.acts)) if i not in right]
        if len(others) < len(right):
            continue  # nowhere to move the marks to
        wrong = {int(i) for i in rng.choice(others, size=len(right), replace=False)}
        tokens = texts(c.token_ids)
        items += [marked_text(tokens, right), marked_text(tokens, wrong)]
        truth += [True, False]
    if not items:
        return None
    order = rng.permutation(len(items))
    shown = [items[i] for i in order]
    truth_ = np.array(truth)[order]
    msgs = [{"role": "system", "content": SYSTEM["fuzzing"]},
            {"role": "user", "content": _user(label, shown)}]

    def check(content: str | None, logprobs: list | None):
        said, probs, error = _booleans("fuzzing", content, logprobs, len(shown))
        if said is None:
            return None, error
        m = {"balanced_accuracy": metrics.balanced_accuracy(truth_, said),
             "accuracy": metrics.accuracy(truth_, said),
             "auc": metrics.auc(truth_, np.array(probs) if probs is not None
                                else said.astype(float)), "logprobs": probs is not None}
        return {"score": m["balanced_accuracy"], "metrics": m}, None

    return Trial("fuzzing", msgs, _schema("fuzzing", [1] * len(shown)), check,
                 len(items) // 2, len(items) // 2, 0)


def simulation(label: str, contexts: list[Context], texts: Callable[[list[int]], list[str]],
               rng: np.random.Generator, scale: float, each: int = SIM_CONTEXTS
               ) -> Trial | None:
    pos = [c for c in contexts if c.positive][:each]
    neg = [c for c in contexts if not c.positive][:each]
    shown = pos + neg
    if not pos or scale <= 0:
        return None
    shown = [shown[i] for i in rng.permutation(len(shown))]
    true = np.concatenate([np.clip(c.acts / scale, 0, 1) * SCALE for c in shown])
    lengths = [len(c.acts) for c in shown]
    excerpts = [json.dumps(texts(c.token_ids), ensure_ascii=False) for c in shown]
    msgs = [{"role": "system", "content": SYSTEM["simulation"]},
            {"role": "user", "content": _user(label, excerpts)
             + "\n\nEach excerpt is a JSON list of its tokens."}]

    def check(content: str | None, logprobs: list | None):
        got, error = _reply("simulation", content, lengths)
        if got is None:
            return None, error
        for i, (row, n) in enumerate(zip(got, lengths, strict=True)):
            if not isinstance(row, list) or len(row) != n:
                return None, (f"invalid reply (excerpt {i + 1}: "
                              f"{len(row) if isinstance(row, list) else 0} numbers for {n} "
                              "tokens)")
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in row):
                return None, f"invalid reply (excerpt {i + 1}: not all integers)"
        sampled = np.clip(np.concatenate([np.asarray(r, float) for r in got]), 0, SCALE)
        got_p = value_probs(logprobs, NUMBERS, len(sampled))
        expected = got_p[0] if got_p and got_p[1] else None
        r_sampled = metrics.pearson(sampled, true)
        r_expected = None if expected is None else metrics.pearson(np.array(expected), true)
        m = {"pearson": r_expected if expected is not None else r_sampled,
             "pearson_sampled": r_sampled, "pearson_expected": r_expected,
             "tokens": len(true), "logprobs": expected is not None}
        return {"score": m["pearson"], "metrics": m}, None

    return Trial("simulation", msgs, _schema("simulation", lengths), check, len(pos), len(neg),
                 sum(c.kind == "hard" for c in neg))


@dataclass(frozen=True)
class Effect:
    """What the intervention check shows about one neuron: the tokens its boost raised
    most, and token sets of other neurons to draw decoys from."""

    raised: list[str]
    decoys: list[list[str]]


def intervention(label: str, effect: Effect, rng: np.random.Generator,
                 rounds: int = ROUNDS, candidates: int = CANDIDATES) -> Trial | None:
    pool = [d for d in effect.decoys if d and d != effect.raised]
    if not effect.raised or len(pool) < candidates - 1:
        return None
    shown, truth = [], []
    for r in range(rounds):
        picked = [pool[i] for i in rng.choice(len(pool), candidates - 1, replace=False)]
        at = int(rng.integers(candidates))
        sets = picked[:at] + [effect.raised] + picked[at:]
        truth.append(at + 1)
        body = "\n".join(f"{i + 1}. {json.dumps(t, ensure_ascii=False)}"
                         for i, t in enumerate(sets))
        shown.append(f"Round {r + 1}:\n{body}")
    msgs = [{"role": "system", "content": SYSTEM["intervention"]},
            {"role": "user", "content": f"Description: {label}\n\n" + "\n\n".join(shown)}]
    fmt = _schema("intervention", [1] * rounds,
                  {"type": "integer", "minimum": 1, "maximum": candidates})

    def check(content: str | None, logprobs: list | None):
        got, error = _reply("intervention", content, [1] * rounds)
        if got is None:
            return None, error
        if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= candidates
                   for v in got):
            return None, f"invalid reply (choices: not all integers from 1 to {candidates})"
        accuracy = float((np.array(truth) == np.array(got)).mean())
        m = {"accuracy": accuracy, "chance": 1 / candidates, "rounds": rounds,
             "candidates": candidates}
        return {"score": accuracy, "metrics": m}, None

    return Trial("intervention", msgs, fmt, check, rounds, rounds * (candidates - 1), 0)


def trials(label: str, contexts: list[Context], decode: Callable[[list[int]], list[str]],
           scale: float, scorers: tuple[str, ...], key: tuple,
           sim_contexts: int = SIM_CONTEXTS, effect: Effect | None = None) -> list[Trial]:
    """The requests of ``scorers`` about one label (those its contexts, or for the
    intervention check its ``effect``, allow); ``key`` (the neuron and label) seeds each
    scorer's shuffles; ``sim_contexts``: positives and negatives each that the
    simulation shows."""
    out = []
    for name in scorers:
        rng = np.random.default_rng(seed(*key, name))
        if name == "detection":
            t = detection(label, contexts, lambda ids: "".join(decode(ids)), rng)
        elif name == "fuzzing":
            t = fuzzing(label, contexts, decode, rng)
        elif name == "simulation":
            t = simulation(label, contexts, decode, rng, scale, sim_contexts)
        elif name == "intervention":
            t = None if effect is None else intervention(label, effect, rng)
        else:
            raise ValueError(f"unknown scorer {name!r}; choose from {', '.join(SCORERS)}")
        if t is not None:
            out.append(t)
    return out


def rounded(fields: dict[str, Any]) -> tuple[float | None, str]:
    """A checked reply's (score, metrics as JSON) for the label_scores table."""
    m = {k: _fmt(v) if isinstance(v, float) else v for k, v in fields["metrics"].items()}
    return _fmt(fields["score"]), json.dumps(m, sort_keys=True)
