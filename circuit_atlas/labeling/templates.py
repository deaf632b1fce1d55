"""The text of the labeling prompts: the only place it lives.

Evidence arrives as a dict of optional sections; a section the atlas does not have
(no projections computed, no labels yet) is left out, never printed as "None".
"""

from __future__ import annotations

from typing import Any

from circuit_atlas.lake.labels import polarity

OUTPUT_TYPES = ("semantic", "lexical", "routing", "formatting", "structural")
INPUT_TYPES = ("token-pattern", "context", "position", "upstream-gated", "combination")
INTERPRETABILITY = ("low", "medium", "high")
DER_MEANING = {"logit-dominant": "it acts mostly through its own effect on the logits",
               "routing-dominant": "it acts mostly through later neurons",
               "mixed": "both directly and through later neurons"}

SYSTEM = {
    "output": (
        "You are an interpretability researcher labelling the MLP neurons of a language "
        "model. From the evidence given, say what this neuron DOES when it fires: which "
        "tokens it promotes or suppresses, which downstream neurons it drives. Be concrete "
        "and short. Answer in JSON with: label (a few words), description (one or two "
        "sentences), type (one of: " + ", ".join(OUTPUT_TYPES) + "), interpretability "
        "(low, medium or high: how clear the evidence is)."),
    "input": (
        "You are an interpretability researcher labelling the MLP neurons of a language "
        "model. From the evidence given, say what TRIGGERS this neuron: which tokens, "
        "contexts or upstream neurons make it fire. Be concrete and short. Answer in JSON "
        "with: label (a few words), description (one or two sentences), type (one of: "
        + ", ".join(INPUT_TYPES) + "), interpretability (low, medium or high)."),
    "negative": (
        "You are an interpretability researcher labelling the MLP neurons of a language "
        "model. A neuron's activation can be negative as well as positive. From the "
        "evidence given, say what drives this neuron's activation most NEGATIVE: which "
        "tokens, contexts or upstream neurons push it below zero. Be concrete and short. "
        "Answer in JSON with: label (a few words), description (one or two sentences), "
        "type (one of: " + ", ".join(INPUT_TYPES) + "), interpretability (low, medium or "
        "high)."),
}


def _tokens(rows: list[tuple[str, float]]) -> str:
    return ", ".join(f"{t!r} ({v:+.3g})" for t, v in rows)


def _neighbours(rows: list[dict[str, Any]], verb_pos: str, verb_neg: str) -> list[str]:
    out = []
    for r in rows:
        verb = verb_pos if r["weight"] >= 0 else verb_neg
        label = f' - "{r["label"]}"' if r.get("label") else ""
        out.append(f"- {r['node']} ({verb}, weight {r['weight']:+.3g}, "
                   f"{r['graphs']} graphs){label}")
    return out


THIN = 5  # graphs below which the evidence from graphs is called thin


def _thin(ev: dict[str, Any]) -> list[str]:
    n = ev.get("appearances")
    if n is None or n >= THIN:
        return []
    return [f"Caution: it appears in only {n} attribution graph{'s' if n != 1 else ''}, so "
            "the graph statistics below rest on very few examples."]


def output_prompt(ev: dict[str, Any]) -> str:
    lines = [f"Neuron {ev['neuron']} (layer {ev['layer']} of {ev['n_layers']})."]
    if ev.get("appearances") is not None:
        line = f"It appears in {ev['appearances']} attribution graphs"
        if ev.get("specificity") is not None:
            s = ev["specificity"]
            line += (f"; domain specificity {s['specificity']:.2f} for {s['domain']} "
                     f"against {s['baseline']}")
        lines.append(line + ".")
    lines += _thin(ev)
    if ev.get("prior"):
        lines.append("Labels from other sources: " + "; ".join(f'"{p}"' for p in ev["prior"]))
    if ev.get("promoted"):
        lines.append("Output projection, tokens it promotes: " + _tokens(ev["promoted"]))
    if ev.get("suppressed"):
        lines.append("Output projection, tokens it suppresses: " + _tokens(ev["suppressed"]))
    if ev.get("der") is not None:
        d = ev["der"]
        lines.append(f"Direct effect ratio {d['der_mean']:.2f} over {d['prompts']} prompts: "
                     f"{d['der_class']} ({DER_MEANING[d['der_class']]}).")
    if ev.get("next_tokens"):
        lines.append("Where it fires most, the model predicts next: " + ", ".join(
            f"{t!r} ({n} of its top contexts)" for t, n in ev["next_tokens"]))
    if ev.get("downstream"):
        lines.append("Strongest downstream targets:")
        lines += _neighbours(ev["downstream"], "excites", "inhibits")
    return "\n".join(lines)


def input_prompt(ev: dict[str, Any], sign: int = 1) -> str:
    """The input pass's prompt (``sign`` 1: what drives the activation up), or the
    negative pass's (-1: what drives it most negative), from the same evidence."""
    lines = [f"Neuron {ev['neuron']} (layer {ev['layer']} of {ev['n_layers']})."]
    lines += _thin(ev)
    if ev.get("output_label"):
        lines.append(f'Its output label (what it does): "{ev["output_label"]}"')
    marks = "activation first; <<marked>> tokens reach at least half of that"
    # the side the label is about in full, the other side's two strongest for contrast
    sections = [("exemplars", f"Contexts where it fires most ({marks}):", None),
                ("negative_exemplars", "Contexts where it is most negative:", 2)]
    if sign < 0:
        sections = [("negative_exemplars",
                     f"Contexts where its activation is most negative ({marks}):", None),
                    ("exemplars", "For contrast, contexts where it fires most:", 2)]
    for key, heading, cut in sections:
        if ev.get(key):
            lines.append(heading)
            lines += [f"- {a:+.3g}: {t!r}" for a, t in ev[key][:cut]]
    if ev.get("token_means"):
        lines.append("Tokens at which it is highest on average in context: "
                     + _tokens(ev["token_means"]))
    if ev.get("static_corr") is not None and ev.get("token_means"):
        rho, n = ev["static_corr"]
        lines.append(f"Rank correlation between that average per token and the static "
                     f"input projection below: {rho:+.2f} over {n} tokens.")
    static = [("activating", "activate it"), ("suppressing", "suppress it")][::sign]
    for key, verb in static:
        if ev.get(key):
            lines.append(f"Static input projection, tokens that {verb}: " + _tokens(ev[key]))
    if ev.get("upstream"):
        lines.append("Strongest upstream sources (signed; an embedding source is the exact "
                     "effect of that input token on it):")
        lines += _neighbours(ev["upstream"], "excites it", "inhibits it")
    if ev.get("input_tokens"):
        lines.append("Tokens at the positions where it fires: " + ", ".join(
            f"{t!r} ({n})" for t, n in ev["input_tokens"]))
    if ev.get("cooccurring"):
        lines.append("Neurons that fire in the same graphs:")
        lines += [f"- {c['node']} (Jaccard {c['jaccard']:.2f})"
                  + (f' - "{c["label"]}"' if c.get("label") else "") for c in ev["cooccurring"]]
    return "\n".join(lines)


def messages(pass_: str, ev: dict[str, Any]) -> list[dict[str, str]]:
    """The chat messages of one neuron's prompt."""
    body = output_prompt(ev) if pass_ == "output" else input_prompt(ev, polarity(pass_))
    return [{"role": "system", "content": SYSTEM[pass_]}, {"role": "user", "content": body}]


def cluster_messages(path: str, members: list[tuple[str, str]]) -> list[dict[str, str]]:
    """A prompt naming a cluster from its members' labels."""
    listing = "\n".join(f"- {nid}: {label}" for nid, label in members)
    return [
        {"role": "system", "content": (
            "You name circuits of language-model neurons. Given the labels of a cluster's "
            "members, answer in JSON with: label (a short name for what the cluster does) "
            "and coherence (a number from 0 to 1: how much the members share one theme).")},
        {"role": "user", "content": f"Cluster {path}, {len(members)} labelled members:\n"
                                    f"{listing}"}]
